//! One error type for the crate. Every failure reaching Python is a `TypeError` or a
//! `ValueError` with a one-line message naming the argument; torch's C++ traces are cut.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Wrong kind of object or dtype.
    Type(String),
    /// Right kind, wrong value: shape, device, range.
    Value(String),
    /// Something outside the caller's control (thread pool creation).
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn type_(msg: impl Into<String>) -> Self {
        Error::Type(msg.into())
    }
    pub fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub fn message(&self) -> &str {
        match self {
            Error::Type(m) | Error::Value(m) | Error::Runtime(m) => m,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// Keeps the first meaningful line of a torch error: tch wraps it ("Internal torch error: …"
/// or `Torch("…")`) and torch appends a C++ backtrace after "Exception raised from".
#[cfg(any(feature = "tch", test))]
pub fn clean_torch_message(raw: &str) -> String {
    let mut msg = raw.trim();
    for prefix in ["Internal torch error:", "Torch error:"] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            msg = rest.trim_start();
        }
    }
    if let Some(inner) = msg
        .strip_prefix("Torch(\"")
        .and_then(|m| m.strip_suffix("\")"))
    {
        msg = inner;
    }
    let msg = msg.replace("\\n", "\n");
    let before_trace = msg.split("Exception raised from").next().unwrap_or("");
    let first = before_trace
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("unknown torch error");
    format!("torch error: {first}")
}

#[cfg(feature = "tch")]
impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        Error::Value(clean_torch_message(&err.to_string()))
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Value(m) => PyValueError::new_err(m),
            Error::Runtime(m) => PyRuntimeError::new_err(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_messages_keep_one_line() {
        let raw = "Torch(\"mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)\\nException raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:193\")";
        let msg = clean_torch_message(raw);
        assert_eq!(
            msg,
            "torch error: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn display_form_is_cleaned_too() {
        let raw = "Internal torch error: expected scalar type Float but found Double\nException raised from x";
        assert_eq!(
            clean_torch_message(raw),
            "torch error: expected scalar type Float but found Double"
        );
    }

    #[test]
    fn error_kinds_keep_their_message() {
        assert_eq!(Error::type_("a").message(), "a");
        assert_eq!(Error::value("b").to_string(), "b");
    }
}
