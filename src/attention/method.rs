//! The one [`Method`] type: which attention algorithm a plan runs, parsed and printed in
//! one place (`name` or `name:key=value,...`, e.g. `sale:tau=0.002,bits=8`), used by the
//! CLI, the web crate, eval, calibration and the benches; and [`MethodStats`], what a
//! sparse method reports about a run.
//!
//! The registry at the bottom of this file lists the selector methods: a new method is
//! its selector file under [`super::select`] and one line there.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use super::AttentionShape;
use super::lut::SparseLut;
use super::params::Params;
use super::select::Selector;
use super::select::anchor::{AnchorConfig, AnchorStats};
use super::select::proxy::{ProxyConfig, ProxyStats};
use super::select::sale::{SaleConfig, SaleStats};
use super::select::window::WindowConfig;
use crate::error::{Error, Result};

pub use super::params::{parse_value, unknown_param};

macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($cfg:ty, $stats:ty) = $name:literal;)*) => {
        /// Which attention algorithm a plan runs.
        #[derive(Clone, Debug, Default, PartialEq, Serialize)]
        #[non_exhaustive]
        pub enum Method {
            /// Exact flash attention: the reference and the fallback.
            #[default]
            Dense,
            /// Sliding-window attention with sink keys (exact, through the block-sparse
            /// executor).
            Window(WindowConfig),
            /// The block-sparse executor with a fixed LUT ([`super::lut::LutUnit::Blocks`]),
            /// e.g. an oracle pattern or a caller's block mask.
            BlockSparse(Arc<SparseLut>),
            /// The stripe executor with fixed key lists ([`super::lut::LutUnit::Keys`]).
            Stripes(Arc<SparseLut>),
            $($(#[$doc])* $variant($cfg),)*
        }

        /// What a sparse method reports about one run (serialized under its method's
        /// name). Every method's statistics carry the executor's pair counts in a
        /// field `pairs` ([`super::select::PassPairs`]).
        #[derive(Clone, Debug, PartialEq, Serialize)]
        #[serde(rename_all = "lowercase")]
        #[non_exhaustive]
        pub enum MethodStats {
            $(#[doc = concat!("Statistics of `", $name, "`.")] $variant($stats),)*
        }

        impl Method {
            /// Every method this build can run from a name alone, in a stable order
            /// (the CLI's and the web demo's pickers list these), with default
            /// parameters.
            pub fn all() -> Vec<Method> {
                vec![Method::Dense, Method::Window(WindowConfig::default()), $(Method::$variant(<$cfg>::default()),)*]
            }

            /// Short name (`dense`, `window`, `block-sparse`, `stripes`, or a
            /// selector's).
            pub fn name(&self) -> &'static str {
                match self {
                    Method::Dense => "dense",
                    Method::Window(_) => "window",
                    Method::BlockSparse(_) => "block-sparse",
                    Method::Stripes(_) => "stripes",
                    $(Method::$variant(_) => $name,)*
                }
            }

            /// The selector of a method that runs on the two-pass executor.
            pub fn selector(&self) -> Option<Arc<dyn Selector>> {
                match self {
                    $(Method::$variant(c) => Some(Arc::new(c.clone())),)*
                    _ => None,
                }
            }

            fn params_mut(&mut self) -> Option<&mut dyn Params> {
                match self {
                    Method::Window(c) => Some(c),
                    $(Method::$variant(c) => Some(c),)*
                    _ => None,
                }
            }

            fn params_ref(&self) -> Option<&dyn Params> {
                match self {
                    Method::Window(c) => Some(c),
                    $(Method::$variant(c) => Some(c),)*
                    _ => None,
                }
            }
        }

        impl MethodStats {
            /// The statistics of runs of one method over consecutive runs of heads of
            /// one problem (each part with its q-heads), as the whole problem's: pair
            /// counts added, per-head lists joined. `None` for no parts or parts of
            /// different methods.
            pub fn concat_heads(parts: Vec<(usize, MethodStats)>) -> Option<MethodStats> {
                match &parts.first()?.1 {
                    $(MethodStats::$variant(_) => {
                        let mut of = Vec::with_capacity(parts.len());
                        for (h, p) in parts {
                            match p {
                                MethodStats::$variant(s) => of.push((h, s)),
                                #[allow(unreachable_patterns)]
                                _ => return None,
                            }
                        }
                        Some(MethodStats::$variant(<$stats>::concat_heads(of)))
                    })*
                }
            }

            /// Fraction of causal pairs computed, the exact pass included.
            pub fn density(&self) -> f64 {
                match self {
                    $(MethodStats::$variant(s) => s.pairs.density(),)*
                }
            }
        }

        impl fmt::Display for MethodStats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(MethodStats::$variant(s) => s.fmt(f),)*
                }
            }
        }
    };
}

// The registry: one line per selector method (variant, config, statistics, name).
registry! {
    /// AnchorAttention: anchor pass, stripe selection, stripe pass.
    Anchor(AnchorConfig, AnchorStats) = "anchor";
    /// SALE: low-bit score estimation, Relative Attention Score block selection,
    /// block-sparse attention on 64 × 32 blocks.
    Sale(SaleConfig, SaleStats) = "sale";
    /// ProxyAttn: head-pooled proxy scores at strided rows, per-head budgets,
    /// block-sparse attention on 128 × 128 blocks.
    Proxy(ProxyConfig, ProxyStats) = "proxy";
}

impl Method {
    /// The method for q-heads `h0..h1` of a problem of `q_heads` run by itself (a head
    /// group of whole [`Method::head_unit`]s): a fixed LUT keeps those heads' rows,
    /// ProxyAttn keeps its proxy groups' size, per-head budgets and thresholds keep
    /// those heads' entries; every other method is the same.
    pub fn for_heads(&self, q_heads: usize, h0: usize, h1: usize) -> Result<Method> {
        let slice = |l: &SparseLut| -> Result<Arc<SparseLut>> {
            if h0 >= h1 || h1 > l.q_heads {
                return Err(Error::InvalidArgument(format!(
                    "heads {h0}..{h1} of a LUT over {} heads",
                    l.q_heads
                )));
            }
            Ok(Arc::new(SparseLut::from_fn(
                h1 - h0,
                l.seq_len,
                l.q_block,
                l.unit,
                |h, b| l.entries(h0 + h, b).to_vec(),
            )?))
        };
        // Per-head parameters keep those heads' entries.
        let heads_of = |v: &Option<Vec<f32>>, what: &str| -> Result<Option<Vec<f32>>> {
            match v {
                None => Ok(None),
                Some(v) if h0 < h1 && h1 <= v.len() => Ok(Some(v[h0..h1].to_vec())),
                Some(v) => Err(Error::InvalidArgument(format!(
                    "heads {h0}..{h1} of {} per-head {what}",
                    v.len()
                ))),
            }
        };
        Ok(match self {
            Method::BlockSparse(l) => Method::BlockSparse(slice(l)?),
            Method::Stripes(l) => Method::Stripes(slice(l)?),
            Method::Proxy(c) => {
                let part = (h1 - h0) * c.groups;
                if h0 >= h1 || h1 > q_heads || !part.is_multiple_of(q_heads) {
                    return Err(Error::InvalidArgument(format!(
                        "heads {h0}..{h1} of {q_heads} are not whole proxy groups ({})",
                        c.groups
                    )));
                }
                Method::Proxy(ProxyConfig {
                    groups: part / q_heads,
                    head_budget: heads_of(&c.head_budget, "budgets")?,
                    ..c.clone()
                })
            }
            Method::Sale(c) => Method::Sale(SaleConfig {
                head_tau: heads_of(&c.head_tau, "thresholds")?,
                head_budget: heads_of(&c.head_budget, "budgets")?,
                ..c.clone()
            }),
            m => m.clone(),
        })
    }

    /// The fewest consecutive q-heads of `shape` that must run together (a head group
    /// of [`super::GroupedAttention`] holds a multiple of them): 1, or for ProxyAttn
    /// the q-heads one proxy head pools.
    pub fn head_unit(&self, shape: &AttentionShape) -> usize {
        self.selector().map_or(1, |s| s.head_unit(shape))
    }

    /// Whether the method keeps its own row state (an exact pass continued by a sparse
    /// one): such plans run without a caller's state and report their final (m, l)
    /// through [`super::AttentionPlan::row_stats`].
    pub fn manages_state(&self) -> bool {
        self.selector().is_some()
    }

    /// Sets one parameter (`theta`, `tau`, `window`, …) by name.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let name = self.name();
        match self.params_mut() {
            Some(p) => p.set(key, value),
            None => Err(Error::InvalidArgument(format!(
                "{name} has no parameters (got `{key}`)"
            ))),
        }
    }
}

impl FromStr for Method {
    type Err = Error;

    /// `name` or `name:key=value,...`: `dense`, `window:window=1024,sinks=4`,
    /// `anchor:theta=8`, `sale:tau=0.002,bits=8`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, params) = s.trim().split_once(':').unwrap_or((s.trim(), ""));
        let mut m = Method::all()
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Method::all().iter().map(|m| m.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown method `{name}` (known: {})",
                    known.join(", ")
                ))
            })?;
        for kv in params.split(',').filter(|x| !x.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::InvalidArgument(format!("`{kv}`: expected key=value")))?;
            m.set(k.trim(), v)?;
        }
        Ok(m)
    }
}

impl fmt::Display for Method {
    /// The form [`FromStr`] reads back: the name, then every parameter that differs
    /// from the default (fixed LUTs print their name only).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        let (Some(p), Ok(default)) = (self.params_ref(), self.name().parse::<Method>()) else {
            return Ok(());
        };
        let base = default.params_ref().map(|d| d.params()).unwrap_or_default();
        let changed: Vec<String> = p
            .params()
            .into_iter()
            .filter(|kv| !base.contains(kv))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !changed.is_empty() {
            write!(f, ":{}", changed.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parameters_round_trip() {
        for s in [
            "dense",
            "window:window=1024",
            "anchor:theta=8,step=8",
            "sale:tau=0.002,bits=8",
            "sale",
            "proxy:gamma=0.9,groups=2,min_budget=512",
        ] {
            let m: Method = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        }
        let m: Method = "anchor:theta=8".parse().unwrap();
        assert!(matches!(m, Method::Anchor(c) if c.theta == 8.0));
        for bad in [
            "nope",
            "dense:x=1",
            "anchor:theta",
            "anchor:zeta=1",
            "sale:bits=x",
        ] {
            assert!(
                matches!(bad.parse::<Method>(), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_selector_configs_are_typed_errors() {
        let shape = crate::attention::AttentionShape::new(4, 2, 512, 64);
        for bad in [
            "anchor:block=96",
            "anchor:step=0",
            "anchor:init_keys=100",
            "anchor:theta=NaN",
            "sale:tau=-1",
            "sale:tau=NaN",
            "sale:bits=2",
            "sale:local=100",
            "proxy:gamma=0",
            "proxy:gamma=1.5",
            "proxy:groups=3",
            "proxy:stride=0",
            "proxy:block=100",
        ] {
            let m: Method = bad.parse().unwrap();
            let sel = m.selector().unwrap();
            assert!(
                matches!(sel.validate(&shape), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
