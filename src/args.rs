//! The argument lists of the `_many` ops and of the optional factor pairs, turned into checked
//! arguments (`crate::providers::Arg`) with messages that name the argument and the matrix.

use crate::error::Error;
use crate::providers::{arg, Arg};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

/// A Python list or tuple (a tensor is iterable too, so it must not pass for a list).
pub fn items<'py>(obj: &Bound<'py, PyAny>, name: &str) -> Result<Vec<Bound<'py, PyAny>>, Error> {
    if let Ok(list) = obj.downcast::<PyList>() {
        return Ok(list.iter().collect());
    }
    if let Ok(tuple) = obj.downcast::<PyTuple>() {
        return Ok(tuple.iter().collect());
    }
    Err(Error::type_(format!(
        "{name} must be a list or tuple of tensors"
    )))
}

pub fn args_of<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    writable: bool,
    len: Option<usize>,
) -> Result<Vec<Arg<'py>>, Error> {
    let list = items(obj, name)?;
    if let Some(n) = len {
        if list.len() != n {
            return Err(Error::value(format!(
                "{name} has {} entries, expected {n} (one per matrix)",
                list.len()
            )));
        }
    }
    list.iter()
        .enumerate()
        .map(|(i, o)| arg(o, &format!("{name}[{i}]"), writable))
        .collect()
}

pub fn optional_list<'py>(
    obj: Option<&Bound<'py, PyAny>>,
    name: &str,
    n: usize,
) -> Result<Option<Vec<Arg<'py>>>, Error> {
    obj.filter(|v| !v.is_none())
        .map(|v| args_of(v, name, false, Some(n)))
        .transpose()
}

/// Two optional arguments that come as a pair (start or reference factors, or their lists):
/// both or neither. `names` reads "a_ref and b_ref"; `neither` says what omitting both means.
pub fn both_or_neither<T>(
    first: Option<T>,
    second: Option<T>,
    names: &str,
    neither: &str,
) -> Result<Option<(T, T)>, Error> {
    match (first, second) {
        (Some(x), Some(y)) => Ok(Some((x, y))),
        (None, None) => Ok(None),
        _ => Err(Error::value(format!(
            "{names} must be given together (or neither, for {neither})"
        ))),
    }
}

/// An optional pair of factors for one matrix.
pub fn given_pair<'a, 'py>(
    first: &'a Option<Arg<'py>>,
    second: &'a Option<Arg<'py>>,
    names: &str,
) -> Result<Option<(&'a Arg<'py>, &'a Arg<'py>)>, Error> {
    both_or_neither(first.as_ref(), second.as_ref(), names, "a fresh adapter")
}

pub type PairLists<'py> = (Vec<Arg<'py>>, Vec<Arg<'py>>);

/// The list form of [`given_pair`]: two optional lists of `n` factors.
pub fn given_pair_lists<'py>(
    first: Option<&Bound<'py, PyAny>>,
    second: Option<&Bound<'py, PyAny>>,
    (name1, name2): (&str, &str),
    n: usize,
) -> Result<Option<PairLists<'py>>, Error> {
    both_or_neither(
        optional_list(first, name1, n)?,
        optional_list(second, name2, n)?,
        &format!("{name1} and {name2}"),
        "fresh adapters",
    )
}

/// The lists of a `_many` call: Ω (or ω), A, B and an optional pair of start or reference
/// factors, one entry per matrix, with at least one matrix and every list as long as Ω's.
pub struct FactorLists<'py> {
    pub omega: Vec<Arg<'py>>,
    pub a: Vec<Arg<'py>>,
    pub b: Vec<Arg<'py>>,
    pair: Option<PairLists<'py>>,
}

impl<'py> FactorLists<'py> {
    pub fn new(
        (omega, omega_name): (&Bound<'py, PyAny>, &str),
        a: &Bound<'py, PyAny>,
        b: &Bound<'py, PyAny>,
        (first, second): (Option<&Bound<'py, PyAny>>, Option<&Bound<'py, PyAny>>),
        pair_names: (&str, &str),
    ) -> Result<Self, Error> {
        let omega = args_of(omega, omega_name, false, None)?;
        let n = omega.len();
        if n == 0 {
            return Err(Error::value(format!(
                "{omega_name} must hold at least one matrix"
            )));
        }
        Ok(FactorLists {
            a: args_of(a, "a", false, Some(n))?,
            b: args_of(b, "b", false, Some(n))?,
            pair: given_pair_lists(first, second, pair_names, n)?,
            omega,
        })
    }

    pub fn len(&self) -> usize {
        self.omega.len()
    }

    /// Matrix i's start or reference factors, if given.
    pub fn pair(&self, i: usize) -> Option<(&Arg<'py>, &Arg<'py>)> {
        self.pair.as_ref().map(|(x, y)| (&x[i], &y[i]))
    }
}

pub fn per_matrix(values: Vec<f64>, name: &str, n: usize) -> Result<Vec<f64>, Error> {
    match values.len() {
        len if len == n => Ok(values),
        1 => Ok(vec![values[0]; n]),
        len => Err(Error::value(format!(
            "{name} has {len} values, expected 1 or {n} (one per matrix)"
        ))),
    }
}
