-- walcast demo: traffic for the bakery in schema.sql.
--
-- `select demo.tick();` performs one business step and returns a line saying
-- what it did. A traffic generator calls it a few times a second, each call in
-- its own transaction; the triggers of schema.sql turn each step into changes
-- on several tables.
--
-- Which step:
--   * every 10th tick (10, 20, …) a scheduled supplier delivery tops up the
--     ingredient with the least stock relative to its reorder point;
--   * every 10th tick offset by 5 (5, 15, …) the baker adjusts a recipe: its
--     price and the quantity of one of its ingredients;
--   * otherwise a weighted random step: place an order (35%), confirm the oldest
--     pending order (25%), bake (15%), deliver (15%), cancel a pending order
--     (5%), sign up a customer (5%); but half the time an ingredient is below
--     its reorder point, a delivery restocks it first.
--   A step with nothing to act on (no pending order to confirm, …) places an
--   order instead, so every tick changes something. An order that cannot be
--   confirmed for lack of an ingredient triggers a delivery of that ingredient.
--
-- So within a dozen ticks every table of the demo sees changes.
--
-- `select demo.tick('confirm');` runs one named step: order, confirm, bake,
-- deliver, cancel, signup, restock, recipe. A named step with nothing to act
-- on returns a line saying so and changes nothing.
--
-- Idempotent: functions are replaced, the tick counter is kept.

begin;

create schema if not exists demo;

-- Counts ticks; drives the scheduled steps.
create sequence if not exists demo.tick_seq;

-- Places an order for a random customer: one to three different recipes, one
-- to four of each (a hotel orders a dozen).
create or replace function demo.place_order() returns text
language plpgsql as $$
declare
    cust record;
    oid  bigint;
    tot  numeric;
    n    integer;
begin
    select id, name, email into cust from public.customers order by random() limit 1;
    if cust.id is null then
        return null;
    end if;
    insert into public.orders (customer_id) values (cust.id) returning id into oid;
    insert into public.order_items (order_id, recipe_id, quantity)
    select oid, r.id,
           case when cust.email like '%.example' then 6 + floor(random() * 7)::int
                else 1 + floor(random() * 4)::int end
      from public.recipes r
     where r.active
     order by random()
     limit 1 + floor(random() * 3)::int;
    select total, (select count(*) from public.order_items where order_id = oid)
      into tot, n
      from public.orders where id = oid;
    return format('order %s placed by %s: %s item(s), total %s', oid, cust.name, n, tot);
end $$;

-- Restocks one ingredient through a supplier delivery: the given one, or the
-- one with the least stock relative to its reorder point. Brings it to three
-- times its reorder point (at least one reorder point's worth).
create or replace function demo.restock(ingredient bigint default null) returns text
language plpgsql as $$
declare
    ing record;
    qty numeric;
    did bigint;
begin
    select id, name, unit, stock, reorder_point, cost into ing
      from public.ingredients
     where ingredient is null or id = ingredient
     order by stock / nullif(reorder_point, 0) nulls last, id
     limit 1;
    if ing.id is null then
        return null;
    end if;
    qty := greatest(ing.reorder_point * 3 - ing.stock, ing.reorder_point, 1);
    insert into public.supplier_deliveries (ingredient_id, quantity, cost)
    values (ing.id, qty, round(qty * ing.cost, 2))
    returning id into did;
    return format('delivery %s: %s %s of %s (stock was %s)',
                  did, qty, ing.unit, ing.name, ing.stock);
end $$;

-- Confirms the oldest pending order the stock can serve. When pending orders
-- exist but none can be served, restocks what the oldest one lacks.
create or replace function demo.confirm_order() returns text
language plpgsql as $$
declare
    oid   bigint;
    short bigint;
    tot   numeric;
begin
    select o.id into oid
      from public.orders o
     where o.status = 'pending'
       and not exists (
           select 1
             from (select ri.ingredient_id, sum(oi.quantity * ri.quantity) as amount
                     from public.order_items oi
                     join public.recipe_ingredients ri on ri.recipe_id = oi.recipe_id
                    where oi.order_id = o.id
                    group by ri.ingredient_id) need
             join public.ingredients i on i.id = need.ingredient_id
            where i.stock < need.amount)
     order by o.id
     limit 1
       for update of o skip locked;
    if oid is not null then
        update public.orders set status = 'confirmed' where id = oid returning total into tot;
        return format('order %s confirmed (total %s): ingredients consumed', oid, tot);
    end if;
    -- Nothing servable: find what the oldest pending order lacks.
    select need.ingredient_id into short
      from public.orders o
      join lateral (select ri.ingredient_id, sum(oi.quantity * ri.quantity) as amount
                      from public.order_items oi
                      join public.recipe_ingredients ri on ri.recipe_id = oi.recipe_id
                     where oi.order_id = o.id
                     group by ri.ingredient_id) need on true
      join public.ingredients i on i.id = need.ingredient_id
     where o.status = 'pending' and i.stock < need.amount
     order by o.id, i.id
     limit 1;
    if short is not null then
        return demo.restock(short);
    end if;
    return null;
end $$;

-- Moves the oldest order in status `from_status` to `to_status`.
create or replace function demo.advance(from_status text, to_status text) returns text
language plpgsql as $$
declare
    oid bigint;
begin
    select id into oid from public.orders
     where status = from_status
     order by id
     limit 1
       for update skip locked;
    if oid is null then
        return null;
    end if;
    update public.orders set status = to_status where id = oid;
    return format('order %s %s', oid, to_status);
end $$;

-- Cancels a random pending order.
create or replace function demo.cancel_order() returns text
language plpgsql as $$
declare
    oid bigint;
begin
    select id into oid from public.orders
     where status = 'pending'
     order by random()
     limit 1
       for update skip locked;
    if oid is null then
        return null;
    end if;
    update public.orders set status = 'cancelled' where id = oid;
    return format('order %s cancelled', oid);
end $$;

-- A new customer signs up.
create or replace function demo.signup() returns text
language plpgsql as $$
declare
    first_names text[] := array['Alan', 'Margaret', 'Dennis', 'Frances', 'Ken', 'Radia',
                                'Niklaus', 'Hedy', 'John', 'Sophie', 'Tim', 'Annie'];
    last_names  text[] := array['Kneader', 'Croissant', 'Loaf', 'Crust', 'Scone',
                                'Pretzel', 'Muffin', 'Bagel', 'Strudel', 'Focaccia'];
    fname text := first_names[1 + floor(random() * array_length(first_names, 1))::int];
    lname text := last_names[1 + floor(random() * array_length(last_names, 1))::int];
    cid   bigint;
begin
    insert into public.customers (name, email)
    values (fname || ' ' || lname,
            lower(fname || '.' || lname) || '.' || floor(random() * 1000000)::bigint || '@example.com')
    on conflict (email) do nothing
    returning id into cid;
    if cid is null then
        return null;
    end if;
    return format('customer %s signed up: %s %s', cid, fname, lname);
end $$;

-- The baker adjusts a recipe: price ±5%, and ±5% of one ingredient.
create or replace function demo.tweak_recipe() returns text
language plpgsql as $$
declare
    rec   record;
    ing       record;
    new_price numeric;
begin
    select id, name into rec from public.recipes where active order by random() limit 1;
    if rec.id is null then
        return null;
    end if;
    update public.recipes
       set price = greatest(round(recipes.price * (0.95 + random() * 0.1)::numeric, 2), 0.50),
           updated_at = now()
     where id = rec.id
    returning recipes.price into new_price;
    select ri.ingredient_id, i.name into ing
      from public.recipe_ingredients ri
      join public.ingredients i on i.id = ri.ingredient_id
     where ri.recipe_id = rec.id
     order by random()
     limit 1;
    if ing.ingredient_id is not null then
        update public.recipe_ingredients
           set quantity = greatest(round(quantity * (0.95 + random() * 0.1)::numeric, 3), 0.001)
         where recipe_id = rec.id and ingredient_id = ing.ingredient_id;
    end if;
    return format('recipe %s now costs %s; adjusted its %s', rec.name, new_price,
                  coalesce(ing.name, 'nothing'));
end $$;

-- One step of bakery life. See the header.
create or replace function demo.tick(step text default null) returns text
language plpgsql as $$
declare
    n      bigint;
    r      double precision := random();
    low    bigint;
    result text;
begin
    if step is null then
        n := nextval('demo.tick_seq');
        select id into low from public.ingredients
         where stock < reorder_point
         order by stock / nullif(reorder_point, 0), id
         limit 1;
        step := case
            when n % 10 = 0 then 'restock'
            when n % 10 = 5 then 'recipe'
            when low is not null and random() < 0.5 then 'restock'
            when r < 0.35 then 'order'
            when r < 0.60 then 'confirm'
            when r < 0.75 then 'bake'
            when r < 0.90 then 'deliver'
            when r < 0.95 then 'cancel'
            else 'signup'
        end;
        result := demo.run_step(step);
        -- Nothing to act on: place an order, so every tick changes something.
        return coalesce(result, demo.place_order(), 'nothing to do: no customers');
    end if;
    return coalesce(demo.run_step(step), format('%s: nothing to do', step));
end $$;

-- Runs a named step; null when it found nothing to act on.
create or replace function demo.run_step(step text) returns text
language plpgsql as $$
begin
    return case step
        when 'order'   then demo.place_order()
        when 'confirm' then demo.confirm_order()
        when 'bake'    then demo.advance('confirmed', 'baked')
        when 'deliver' then demo.advance('baked', 'delivered')
        when 'cancel'  then demo.cancel_order()
        when 'signup'  then demo.signup()
        when 'restock' then demo.restock()
        when 'recipe'  then demo.tweak_recipe()
        else demo.unknown_step(step)
    end;
end $$;

create or replace function demo.unknown_step(step text) returns text
language plpgsql as $$
begin
    raise exception 'unknown demo step %', quote_literal(step)
        using hint = 'use one of: order, confirm, bake, deliver, cancel, signup, restock, recipe';
end $$;

commit;
