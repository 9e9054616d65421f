//! A method's parameters by name (`name:key=value,...`): the [`Params`] trait every
//! method config implements, usually through the crate-internal `impl_params!` macro, and the value parser.
//! Nothing here knows a method: [`super::method`] lists them.

use std::str::FromStr;

use crate::error::{Error, Result};

/// A method's parameters by name: what `name:key=value,...` sets and [`super::Method`]'s
/// `Display` prints.
pub trait Params {
    /// Sets one parameter from its text.
    fn set(&mut self, key: &str, value: &str) -> Result<()>;
    /// Every parameter and its value, in a stable order.
    fn params(&self) -> Vec<(&'static str, String)>;
}

/// Parses one parameter value; the error names the key.
pub fn parse_value<T: FromStr>(key: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("`{key}={value}`: not a valid value")))
}

/// The error for a key a method does not have.
pub fn unknown_param(method: &str, key: &str, known: &str) -> Error {
    Error::InvalidArgument(format!(
        "`{key}` is not a parameter of {method} (known: {known})"
    ))
}

/// Implements [`Params`] for a config struct from its field list: each field is set
/// by its name (or an alias) through [`parse_value`] and printed with `to_string`.
///
/// `impl_params!(AnchorConfig, "anchor" { theta, block, step, init_keys | "init" });`
macro_rules! impl_params {
    ($ty:ty, $method:literal { $($field:ident $(| $alias:literal)*),* $(,)? }) => {
        impl $crate::attention::params::Params for $ty {
            fn set(&mut self, key: &str, value: &str) -> $crate::error::Result<()> {
                use $crate::attention::params::{parse_value, unknown_param};
                match key {
                    $(stringify!($field) $(| $alias)* => self.$field = parse_value(key, value)?,)*
                    _ => {
                        let known = [$(stringify!($field)),*].join(", ");
                        return Err(unknown_param($method, key, &known));
                    }
                }
                Ok(())
            }
            fn params(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($field), self.$field.to_string())),*]
            }
        }
    };
}
pub(crate) use impl_params;
