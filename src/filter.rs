//! Row filters (placeholder with the agreed API; replaced by the full PostgREST grammar).

use crate::event::Row;
use crate::relation::Table;
use crate::value::PgType;

#[derive(Clone, Debug, Default)]
pub struct Filter {
    conds: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter {0:?}")]
    Syntax(String),
    #[error("unknown column {0:?}")]
    UnknownColumn(String),
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        let mut conds = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (col, rest) = part
                .split_once('=')
                .ok_or_else(|| FilterError::Syntax(s.into()))?;
            let v = rest
                .strip_prefix("eq.")
                .ok_or_else(|| FilterError::Syntax(s.into()))?;
            conds.push((col.trim().to_string(), v.to_string()));
        }
        Ok(Filter { conds })
    }

    pub fn and(mut self, other: Filter) -> Filter {
        self.conds.extend(other.conds);
        self
    }

    pub fn bind(&self, table: &Table) -> Result<BoundFilter, FilterError> {
        let mut conds = Vec::new();
        for (c, v) in &self.conds {
            let i = table
                .column_index(c)
                .ok_or_else(|| FilterError::UnknownColumn(c.clone()))?;
            conds.push((i, v.clone()));
        }
        Ok(BoundFilter { conds })
    }
}

#[derive(Clone, Debug)]
pub struct BoundFilter {
    conds: Vec<(usize, String)>,
}

impl BoundFilter {
    pub fn matches(&self, row: &Row) -> bool {
        self.conds
            .iter()
            .all(|(i, v)| row.get(*i).and_then(|c| c.text()) == Some(v.as_str()))
    }
    pub fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }
    pub fn index_key(&self) -> Option<(usize, Vec<String>)> {
        self.conds.first().map(|(i, v)| (*i, vec![v.clone()]))
    }
}

pub fn canonical_key(_ty: &PgType, text: &str) -> Option<String> {
    Some(text.to_string())
}
