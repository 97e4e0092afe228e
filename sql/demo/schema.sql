-- walcast demo: a small bakery.
--
-- Modelled on a bakery ERP: ingredients in stock, recipes made of ingredients,
-- customers who place orders, and an inventory log that records every stock
-- movement. The business rules live in triggers, so every step of the traffic
-- generator (traffic.sql) fans out into changes on several tables — which is
-- what a live dashboard wants to see.
--
-- Order life cycle:
--
--     pending ──► confirmed ──► baked ──► delivered
--        │
--        └──► cancelled
--
-- Rules (all in triggers below):
--   * order_items take the recipe's price when none is given, may only change
--     while the order is pending, and keep orders.total up to date;
--   * an order may only move along the arrows above; each move stamps its time;
--   * confirming an order (pending → confirmed) consumes the ingredients of its
--     items (recipe_ingredients.quantity per unit × item quantity), refusing if
--     stock is short, and writes one inventory_logs row per ingredient;
--   * customer analytics are updated ON CONFIRMATION: total_orders + 1,
--     total_spent + total, loyalty_points + one point per whole currency unit.
--     A pending order may still be cancelled and never counts; a confirmed order
--     cannot be cancelled, so no reversal is needed;
--   * a supplier delivery restocks its ingredient and writes an inventory_logs row.
--
-- Every table has REPLICA IDENTITY FULL, so UPDATE and DELETE events carry the
-- whole old row (walcast's `old_record`), and DELETE filters can use any column.
-- The publication `walcast` lists exactly these tables.
--
-- The script is idempotent: running it again keeps existing data, replaces the
-- functions and triggers, and re-seeds only what is missing.

begin;

-- Functions live in their own schema; tables stay in `public`, where
-- supabase-js looks by default.
create schema if not exists demo;

-- Ingredients in stock. `stock` and `reorder_point` are in `unit`.
create table if not exists public.ingredients (
    id            bigint generated always as identity primary key,
    name          text not null unique,
    unit          text not null check (unit in ('kg', 'l', 'pcs')),
    stock         numeric(12, 3) not null default 0 check (stock >= 0),
    reorder_point numeric(12, 3) not null default 0 check (reorder_point >= 0),
    cost          numeric(10, 2) not null check (cost >= 0),  -- per unit
    updated_at    timestamptz not null default now()
);

-- What the bakery sells.
create table if not exists public.recipes (
    id         bigint generated always as identity primary key,
    name       text not null unique,
    price      numeric(10, 2) not null check (price > 0),      -- per unit sold
    active     boolean not null default true,
    updated_at timestamptz not null default now()
);

-- How much of each ingredient one unit of a recipe needs.
create table if not exists public.recipe_ingredients (
    recipe_id     bigint not null references public.recipes (id) on delete cascade,
    ingredient_id bigint not null references public.ingredients (id),
    quantity      numeric(10, 3) not null check (quantity > 0),  -- in the ingredient's unit
    primary key (recipe_id, ingredient_id)
);

create table if not exists public.customers (
    id             bigint generated always as identity primary key,
    name           text not null,
    email          text not null unique,
    total_orders   integer not null default 0,
    total_spent    numeric(12, 2) not null default 0,
    loyalty_points integer not null default 0,
    last_order_at  timestamptz,
    created_at     timestamptz not null default now()
);

create table if not exists public.orders (
    id           bigint generated always as identity primary key,
    customer_id  bigint not null references public.customers (id),
    status       text not null default 'pending'
                 check (status in ('pending', 'confirmed', 'baked', 'delivered', 'cancelled')),
    total        numeric(12, 2) not null default 0,  -- kept by the order_items trigger
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    confirmed_at timestamptz,
    baked_at     timestamptz,
    delivered_at timestamptz,
    cancelled_at timestamptz
);
create index if not exists orders_status_idx on public.orders (status, id);

create table if not exists public.order_items (
    id        bigint generated always as identity primary key,
    order_id  bigint not null references public.orders (id) on delete cascade,
    recipe_id bigint not null references public.recipes (id),
    quantity  integer not null check (quantity > 0),
    price     numeric(10, 2) not null check (price >= 0)  -- per unit, copied from the recipe
);
create index if not exists order_items_order_idx on public.order_items (order_id);

-- Ingredients arriving from suppliers. (Not an order's `delivered` status: that
-- is bread going out; this is flour coming in.)
create table if not exists public.supplier_deliveries (
    id            bigint generated always as identity primary key,
    ingredient_id bigint not null references public.ingredients (id),
    quantity      numeric(12, 3) not null check (quantity > 0),
    cost          numeric(12, 2) not null check (cost >= 0),
    received_at   timestamptz not null default now()
);

-- Every stock movement: negative for consumption, positive for deliveries.
create table if not exists public.inventory_logs (
    id            bigint generated always as identity primary key,
    ingredient_id bigint not null references public.ingredients (id),
    delta         numeric(12, 3) not null,
    stock_after   numeric(12, 3) not null,
    reason        text not null check (reason in ('order', 'delivery', 'adjustment')),
    order_id      bigint references public.orders (id),
    delivery_id   bigint references public.supplier_deliveries (id),
    at            timestamptz not null default now()
);
create index if not exists inventory_logs_order_idx on public.inventory_logs (order_id);

-- ---------------------------------------------------------------------------
-- order_items: default price, pending-only edits, keep orders.total.

create or replace function demo.order_items_check() returns trigger
language plpgsql as $$
declare
    st text;
begin
    select status into st from public.orders
     where id = coalesce(new.order_id, old.order_id);
    if st is not null and st <> 'pending' then
        raise exception 'order % is %; items can only change while it is pending',
            coalesce(new.order_id, old.order_id), st;
    end if;
    if tg_op = 'INSERT' and new.price is null then
        select price into new.price from public.recipes where id = new.recipe_id;
    end if;
    return coalesce(new, old);
end $$;

create or replace function demo.order_items_total() returns trigger
language plpgsql as $$
begin
    update public.orders o
       set total = coalesce((select sum(i.quantity * i.price)
                               from public.order_items i
                              where i.order_id = o.id), 0)
     where o.id in (new.order_id, old.order_id);
    return null;
end $$;

drop trigger if exists order_items_check on public.order_items;
create trigger order_items_check
    before insert or update or delete on public.order_items
    for each row execute function demo.order_items_check();

drop trigger if exists order_items_total on public.order_items;
create trigger order_items_total
    after insert or update or delete on public.order_items
    for each row execute function demo.order_items_total();

-- ---------------------------------------------------------------------------
-- orders: allowed status moves and their timestamps.

create or replace function demo.orders_status() returns trigger
language plpgsql as $$
begin
    new.updated_at := now();
    if new.status = old.status then
        return new;
    end if;
    if not (old.status, new.status) in (('pending', 'confirmed'),
                                        ('pending', 'cancelled'),
                                        ('confirmed', 'baked'),
                                        ('baked', 'delivered')) then
        raise exception 'order % cannot go from % to %', old.id, old.status, new.status
            using hint = 'orders move pending → confirmed → baked → delivered, or pending → cancelled';
    end if;
    case new.status
        when 'confirmed' then new.confirmed_at := now();
        when 'baked'     then new.baked_at := now();
        when 'delivered' then new.delivered_at := now();
        when 'cancelled' then new.cancelled_at := now();
    end case;
    return new;
end $$;

drop trigger if exists orders_status on public.orders;
create trigger orders_status
    before update on public.orders
    for each row execute function demo.orders_status();

-- ---------------------------------------------------------------------------
-- Confirmation consumes ingredients and logs each movement.

create or replace function demo.orders_consume_ingredients() returns trigger
language plpgsql as $$
declare
    need record;
    have numeric;
begin
    -- What the order needs, per ingredient, in id order: locking rows in a
    -- fixed order keeps two concurrent confirmations from deadlocking.
    for need in
        select i.id, i.name, i.unit, sum(oi.quantity * ri.quantity) as amount
          from public.order_items oi
          join public.recipe_ingredients ri on ri.recipe_id = oi.recipe_id
          join public.ingredients i on i.id = ri.ingredient_id
         where oi.order_id = new.id
         group by i.id
         order by i.id
    loop
        select stock into have from public.ingredients where id = need.id for update;
        if have < need.amount then
            raise exception 'not enough % to confirm order %: need % %, have % %',
                need.name, new.id, need.amount, need.unit, have, need.unit
                using hint = 'record a supplier delivery first';
        end if;
        update public.ingredients
           set stock = stock - need.amount, updated_at = now()
         where id = need.id;
        insert into public.inventory_logs (ingredient_id, delta, stock_after, reason, order_id)
        values (need.id, -need.amount, have - need.amount, 'order', new.id);
    end loop;
    return null;
end $$;

drop trigger if exists orders_consume_ingredients on public.orders;
create trigger orders_consume_ingredients
    after update of status on public.orders
    for each row
    when (old.status = 'pending' and new.status = 'confirmed')
    execute function demo.orders_consume_ingredients();

-- ---------------------------------------------------------------------------
-- Customer analytics, counted on confirmation (see the header).

create or replace function demo.orders_customer_analytics() returns trigger
language plpgsql as $$
begin
    update public.customers
       set total_orders   = total_orders + 1,
           total_spent    = total_spent + new.total,
           loyalty_points = loyalty_points + floor(new.total)::integer,
           last_order_at  = now()
     where id = new.customer_id;
    return null;
end $$;

drop trigger if exists orders_customer_analytics on public.orders;
create trigger orders_customer_analytics
    after update of status on public.orders
    for each row
    when (old.status = 'pending' and new.status = 'confirmed')
    execute function demo.orders_customer_analytics();

-- ---------------------------------------------------------------------------
-- A supplier delivery restocks its ingredient.

create or replace function demo.supplier_deliveries_restock() returns trigger
language plpgsql as $$
declare
    after_stock numeric;
begin
    update public.ingredients
       set stock = stock + new.quantity, updated_at = now()
     where id = new.ingredient_id
    returning stock into after_stock;
    insert into public.inventory_logs (ingredient_id, delta, stock_after, reason, delivery_id)
    values (new.ingredient_id, new.quantity, after_stock, 'delivery', new.id);
    return null;
end $$;

drop trigger if exists supplier_deliveries_restock on public.supplier_deliveries;
create trigger supplier_deliveries_restock
    after insert on public.supplier_deliveries
    for each row execute function demo.supplier_deliveries_restock();

-- ---------------------------------------------------------------------------
-- Full old rows in the WAL, and the publication walcast reads.

alter table public.ingredients         replica identity full;
alter table public.recipes             replica identity full;
alter table public.recipe_ingredients  replica identity full;
alter table public.customers           replica identity full;
alter table public.orders              replica identity full;
alter table public.order_items         replica identity full;
alter table public.supplier_deliveries replica identity full;
alter table public.inventory_logs      replica identity full;

do $$
begin
    if not exists (select 1 from pg_publication where pubname = 'walcast') then
        create publication walcast;
    end if;
end $$;
alter publication walcast set table
    public.ingredients, public.recipes, public.recipe_ingredients,
    public.customers, public.orders, public.order_items,
    public.supplier_deliveries, public.inventory_logs;

-- ---------------------------------------------------------------------------
-- Seed data. Stock levels are a few dozen units so that a demo running for a
-- minute or two sees ingredients fall below their reorder point and get
-- restocked.

insert into public.ingredients (name, unit, stock, reorder_point, cost) values
    ('flour',        'kg',  80,  20,  0.90),
    ('rye flour',    'kg',  40,  15,  1.20),
    ('water',        'l',  200,  20,  0.01),
    ('salt',         'kg',  10,   2,  0.50),
    ('yeast',        'kg',   5,   1,  6.00),
    ('sugar',        'kg',  30,  10,  1.10),
    ('butter',       'kg',  25,  10,  8.50),
    ('milk',         'l',   40,  15,  1.00),
    ('eggs',         'pcs', 180, 60,  0.25),
    ('chocolate',    'kg',  12,   5, 11.00),
    ('cinnamon',     'kg',   3,   1, 15.00),
    ('sourdough starter', 'kg', 10, 3, 0.00)
on conflict (name) do nothing;

insert into public.recipes (name, price) values
    ('sourdough loaf',   6.50),
    ('rye bread',        5.80),
    ('baguette',         2.90),
    ('croissant',        2.40),
    ('pain au chocolat', 2.80),
    ('cinnamon roll',    3.20),
    ('brioche',          4.90)
on conflict (name) do nothing;

-- (recipe, ingredient, quantity per unit produced)
insert into public.recipe_ingredients (recipe_id, ingredient_id, quantity)
select r.id, i.id, v.quantity
  from (values
    ('sourdough loaf',   'flour',             0.500),
    ('sourdough loaf',   'water',             0.350),
    ('sourdough loaf',   'salt',              0.010),
    ('sourdough loaf',   'sourdough starter', 0.100),
    ('rye bread',        'rye flour',         0.400),
    ('rye bread',        'flour',             0.100),
    ('rye bread',        'water',             0.350),
    ('rye bread',        'salt',              0.010),
    ('rye bread',        'sourdough starter', 0.120),
    ('baguette',         'flour',             0.250),
    ('baguette',         'water',             0.170),
    ('baguette',         'salt',              0.005),
    ('baguette',         'yeast',             0.003),
    ('croissant',        'flour',             0.080),
    ('croissant',        'butter',            0.045),
    ('croissant',        'milk',              0.030),
    ('croissant',        'sugar',             0.010),
    ('croissant',        'yeast',             0.002),
    ('pain au chocolat', 'flour',             0.080),
    ('pain au chocolat', 'butter',            0.045),
    ('pain au chocolat', 'milk',              0.030),
    ('pain au chocolat', 'chocolate',         0.020),
    ('pain au chocolat', 'yeast',             0.002),
    ('cinnamon roll',    'flour',             0.090),
    ('cinnamon roll',    'butter',            0.030),
    ('cinnamon roll',    'sugar',             0.025),
    ('cinnamon roll',    'cinnamon',          0.004),
    ('cinnamon roll',    'eggs',              0.5),
    ('cinnamon roll',    'yeast',             0.002),
    ('brioche',          'flour',             0.250),
    ('brioche',          'butter',            0.100),
    ('brioche',          'eggs',              2),
    ('brioche',          'sugar',             0.030),
    ('brioche',          'milk',              0.050),
    ('brioche',          'yeast',             0.005)
  ) as v (recipe, ingredient, quantity)
  join public.recipes r on r.name = v.recipe
  join public.ingredients i on i.name = v.ingredient
on conflict (recipe_id, ingredient_id) do nothing;

insert into public.customers (name, email) values
    ('Ada Baker',      'ada@example.com'),
    ('Grace Miller',   'grace@example.com'),
    ('Linus Crumb',    'linus@example.com'),
    ('Barbara Rye',    'barbara@example.com'),
    ('Edsger Dough',   'edsger@example.com'),
    ('Katherine Bun',  'katherine@example.com'),
    ('Café Lovelace',  'orders@cafe-lovelace.example'),
    ('Hotel Hopper',   'kitchen@hotel-hopper.example')
on conflict (email) do nothing;

commit;
