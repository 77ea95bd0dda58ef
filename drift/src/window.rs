//! The window of recent rows: [`CurrentSample`] keeps the most recent
//! `max_rows` rows as values (numbers as `f64`, categories interned per
//! column in a `CategoryWindow`), within the memory bound stated in the crate
//! doc. Nothing here computes a statistic.

use std::collections::{BTreeMap, HashMap};

use crate::kind::{check_names, check_row};
use crate::{Baseline, DriftError, DriftKind, DriftValue};

/// Sentinel category id for a missing categorical value.
const MISSING_ID: u32 = u32::MAX;

/// The most recent `max_rows` rows (a ring), compared against a baseline with
/// [`compare`](crate::compare()). See the crate doc for its memory bound.
#[derive(Debug, Clone)]
pub struct CurrentSample {
    features: Vec<(String, DriftKind)>,
    columns: Vec<WindowColumn>,
    max_rows: usize,
    len: usize,
    /// Slot of the oldest row once the ring is full.
    head: usize,
    seen: u64,
}

/// One column of the window, read by [`compare`](crate::compare()).
#[derive(Debug, Clone)]
pub(crate) enum WindowColumn {
    /// NaN marks a missing value.
    Numeric(Vec<f64>),
    Categorical(CategoryWindow),
}

/// Interned categories of one column: a slot per row holds a category id.
#[derive(Debug, Clone, Default)]
pub(crate) struct CategoryWindow {
    slots: Vec<u32>,
    ids: HashMap<String, u32>,
    /// Id → name (empty while the id is free).
    names: Vec<String>,
    /// Id → rows of the window with this category.
    counts: Vec<u64>,
    free: Vec<u32>,
    missing: usize,
}

impl CategoryWindow {
    fn acquire(&mut self, v: Option<&str>) -> u32 {
        let Some(s) = v else {
            self.missing += 1;
            return MISSING_ID;
        };
        if let Some(&id) = self.ids.get(s) {
            self.counts[id as usize] += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.names.push(String::new());
                self.counts.push(0);
                u32::try_from(self.names.len() - 1)
                    .ok()
                    .filter(|&id| id != MISSING_ID)
                    .expect("fewer than 2^32 - 1 distinct categories in one window")
            }
        };
        self.names[id as usize] = s.to_owned();
        self.counts[id as usize] = 1;
        self.ids.insert(s.to_owned(), id);
        id
    }

    fn release(&mut self, id: u32) {
        if id == MISSING_ID {
            self.missing -= 1;
            return;
        }
        let i = id as usize;
        self.counts[i] -= 1;
        if self.counts[i] == 0 {
            let name = std::mem::take(&mut self.names[i]);
            self.ids.remove(&name);
            self.free.push(id);
        }
    }

    /// Missing values in the window.
    pub(crate) fn missing(&self) -> usize {
        self.missing
    }

    /// Category → count, sorted by category.
    pub(crate) fn counts(&self) -> BTreeMap<&str, u64> {
        self.names
            .iter()
            .zip(&self.counts)
            .filter(|(_, c)| **c > 0)
            .map(|(n, c)| (n.as_str(), *c))
            .collect()
    }
}

impl CurrentSample {
    /// An empty sample for the features of `baseline`, in baseline order,
    /// keeping at most `max_rows` rows (at least 1; `usize::MAX` for no bound).
    pub fn new(baseline: &Baseline, max_rows: usize) -> CurrentSample {
        CurrentSample::build(baseline.feature_kinds(), max_rows)
    }

    /// An empty sample for these features (names must be unique).
    pub fn with_features<S: Into<String>>(
        features: impl IntoIterator<Item = (S, DriftKind)>,
        max_rows: usize,
    ) -> Result<CurrentSample, DriftError> {
        Ok(CurrentSample::build(check_names(features)?, max_rows))
    }

    fn build(features: Vec<(String, DriftKind)>, max_rows: usize) -> CurrentSample {
        let columns = features
            .iter()
            .map(|(_, k)| match k {
                DriftKind::Numeric => WindowColumn::Numeric(Vec::new()),
                DriftKind::Categorical => WindowColumn::Categorical(CategoryWindow::default()),
            })
            .collect();
        CurrentSample {
            features,
            columns,
            max_rows: max_rows.max(1),
            len: 0,
            head: 0,
            seen: 0,
        }
    }

    /// Adds one row (one value per feature, in [`features`](Self::features)
    /// order), evicting the oldest row when the window is full. A rejected
    /// row changes nothing.
    pub fn push_row(&mut self, row: &[DriftValue<'_>]) -> Result<(), DriftError> {
        check_row(&self.features, row)?;
        let slot = (self.len == self.max_rows).then_some(self.head);
        for (col, v) in self.columns.iter_mut().zip(row) {
            match col {
                WindowColumn::Numeric(values) => {
                    let x = match v {
                        DriftValue::Num(x) if x.is_finite() => *x,
                        _ => f64::NAN,
                    };
                    match slot {
                        Some(s) => values[s] = x,
                        None => values.push(x),
                    }
                }
                WindowColumn::Categorical(w) => {
                    let id = w.acquire(match v {
                        DriftValue::Cat(s) => Some(s),
                        _ => None,
                    });
                    match slot {
                        Some(s) => {
                            let old = std::mem::replace(&mut w.slots[s], id);
                            w.release(old);
                        }
                        None => w.slots.push(id),
                    }
                }
            }
        }
        match slot {
            Some(s) => self.head = (s + 1) % self.max_rows,
            None => self.len += 1,
        }
        self.seen += 1;
        Ok(())
    }

    /// Feature names and kinds, in row order.
    pub fn features(&self) -> &[(String, DriftKind)] {
        &self.features
    }

    /// Rows currently in the window.
    pub fn rows(&self) -> usize {
        self.len
    }

    /// Column `i` (in [`features`](Self::features) order).
    pub(crate) fn column(&self, i: usize) -> &WindowColumn {
        &self.columns[i]
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Rows pushed since creation (or the last [`clear`](Self::clear)), evicted ones included.
    pub fn rows_seen(&self) -> u64 {
        self.seen
    }

    /// Empties the window (keeps the features and the bound).
    pub fn clear(&mut self) {
        *self = CurrentSample::build(std::mem::take(&mut self.features), self.max_rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BaselineBuilder, DriftConfig, compare};

    #[test]
    fn window_keeps_the_most_recent_rows() {
        let baseline = {
            let mut b =
                BaselineBuilder::new([("x", DriftKind::Numeric), ("c", DriftKind::Categorical)])
                    .unwrap();
            for i in 0..100 {
                b.push_row(&[
                    DriftValue::Num(i as f64),
                    DriftValue::Cat(if i % 2 == 0 { "even" } else { "odd" }),
                ])
                .unwrap();
            }
            b.finish()
        };
        let mut s = CurrentSample::new(&baseline, 3);
        let names = ["p", "q", "p", "r", "s", "s"];
        for (i, c) in names.iter().enumerate() {
            let v = if i == 4 {
                DriftValue::Missing
            } else {
                DriftValue::Cat(c)
            };
            s.push_row(&[DriftValue::Num(i as f64), v]).unwrap();
        }
        assert_eq!((s.rows(), s.rows_seen(), s.max_rows()), (3, 6, 3));
        // Window: rows 3, 4, 5 → x = 3, 4, 5; c = r, missing, s.
        let WindowColumn::Numeric(x) = &s.columns[0] else {
            unreachable!()
        };
        let mut x = x.clone();
        x.sort_by(f64::total_cmp);
        assert_eq!(x, [3.0, 4.0, 5.0]);
        let WindowColumn::Categorical(w) = &s.columns[1] else {
            unreachable!()
        };
        assert_eq!(w.counts(), BTreeMap::from([("r", 1), ("s", 1)]));
        assert_eq!(
            (w.missing, w.ids.len()),
            (1, 2),
            "evicted categories are forgotten"
        );
        let r = compare(&baseline, &s, &DriftConfig::default()).unwrap();
        assert_eq!(
            (r.rows, r.features[1].missing, r.features[1].current_rows),
            (3, 1, 3)
        );
        s.clear();
        assert_eq!((s.rows(), s.rows_seen()), (0, 0));
        assert_eq!(CurrentSample::new(&baseline, 0).max_rows(), 1);
    }
}
