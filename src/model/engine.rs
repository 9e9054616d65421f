//! One model, two engines: [`Engine`] runs a GGUF model either on the CPU decoder
//! ([`Decoder`]: projections on the CPU in the file's blocks, attention on its context)
//! or wholly on a GPU ([`GpuDecoder`]). [`EngineKind::Auto`] picks the GPU decoder when
//! the context is a GPU and the architecture runs there, else the CPU decoder, so a
//! command runs on the best device it is given and falls back to the CPU.

use crate::attention::Method;
use crate::error::{Error, Result};
use crate::model::decoder::{Config, Decoder, KvCache};
use crate::model::gguf::Gguf;
use crate::model::gpu::{GpuDecoder, GpuKvCache};
use crate::model::sample::{Sampler, generation_loop};
use crate::runtime::context::Context;

/// Which decoder runs a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The GPU decoder on a GPU context (for the architectures it runs), else the CPU.
    #[default]
    Auto,
    /// The CPU decoder (attention on the context's device).
    Cpu,
    /// The GPU decoder (an error on a CPU context).
    Gpu,
}

impl std::str::FromStr for EngineKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "cpu" => Ok(EngineKind::Cpu),
            "gpu" => Ok(EngineKind::Gpu),
            o => Err(Error::InvalidArgument(format!(
                "engine `{o}`: auto, cpu or gpu"
            ))),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Cpu => "cpu",
            EngineKind::Gpu => "gpu",
        })
    }
}

/// A loaded model on one of the two decoders.
pub enum Engine {
    /// The CPU decoder.
    Cpu(Decoder),
    /// The GPU decoder, with the prefill chunk it runs long prompts in.
    Gpu(GpuDecoder),
}

impl Engine {
    /// Loads `g` on `ctx` with the prompt attention `method`, on the decoder `kind` asks.
    pub fn load(g: &Gguf, ctx: &Context, method: Method, kind: EngineKind) -> Result<Self> {
        match kind {
            EngineKind::Gpu => Ok(Engine::Gpu(GpuDecoder::load(g, ctx, method)?)),
            EngineKind::Auto if !ctx.is_cpu() => Ok(Engine::Gpu(GpuDecoder::load(g, ctx, method)?)),
            _ => Ok(Engine::Cpu(Decoder::load(g, ctx, method)?)),
        }
    }

    /// The model's configuration.
    pub fn cfg(&self) -> &Config {
        match self {
            Engine::Cpu(d) => &d.cfg,
            Engine::Gpu(d) => &d.cfg,
        }
    }

    /// The context.
    pub fn context(&self) -> &Context {
        match self {
            Engine::Cpu(d) => d.context(),
            Engine::Gpu(d) => d.context(),
        }
    }

    /// `cpu` or `gpu`.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Cpu(_) => EngineKind::Cpu,
            Engine::Gpu(_) => EngineKind::Gpu,
        }
    }

    /// Replaces the prompt attention: `method` for every layer but those in
    /// `layer_methods` (calibrated per-layer methods), on either decoder.
    pub fn set_methods(
        &mut self,
        method: Method,
        layer_methods: std::collections::HashMap<usize, Method>,
    ) {
        match self {
            Engine::Cpu(d) => {
                d.set_method(method);
                d.layer_methods = layer_methods;
            }
            Engine::Gpu(d) => {
                d.set_method(method);
                d.layer_methods = layer_methods;
            }
        }
    }

    /// Bytes of the weights as held.
    pub fn weight_bytes(&self) -> u64 {
        match self {
            Engine::Cpu(d) => d.weight_bytes() as u64,
            Engine::Gpu(d) => d.weight_bytes(),
        }
    }

    /// Generation from an empty cache: prefill `prompt`, then up to `max_new` tokens
    /// chosen by `sampler`, stopping early at any of `stop`.
    pub fn generate_with(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>> {
        match self {
            Engine::Cpu(d) => d.generate_with(prompt, max_new, stop, sampler, on_token),
            Engine::Gpu(d) => {
                let mut cache = d.new_cache(prompt.len() + max_new)?;
                d.generate_with(prompt, max_new, stop, sampler, &mut cache, on_token)
            }
        }
    }

    /// Mean next-token negative log-likelihood (nats) of `ids` and the count of
    /// predictions.
    pub fn nll(&self, ids: &[u32]) -> Result<(f64, usize)> {
        match self {
            Engine::Cpu(d) => d.nll(ids),
            Engine::Gpu(d) => d.nll(ids, d.default_chunk()),
        }
    }
}

/// A conversation's KV cache and the tokens it holds, kept from turn to turn
/// ([`Engine::reply`]).
pub struct ChatSession {
    cache: SessionCache,
    ids: Vec<u32>,
}

enum SessionCache {
    Cpu(KvCache),
    Gpu(GpuKvCache),
}

impl ChatSession {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True before the first turn.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Length of the common prefix of two id lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Engine {
    /// An empty conversation with room for `capacity` tokens (the GPU cache reserves
    /// them; the CPU cache grows).
    pub fn new_session(&self, capacity: usize) -> Result<ChatSession> {
        Ok(ChatSession {
            cache: match self {
                Engine::Cpu(d) => SessionCache::Cpu(d.new_cache()),
                Engine::Gpu(d) => SessionCache::Gpu(d.new_cache(capacity)?),
            },
            ids: Vec::new(),
        })
    }

    /// The reply to `prompt` (the ids of the whole transcript so far, ending where the
    /// model answers): the session's cache keeps the longest prefix it shares with
    /// `prompt` and only the rest is prefilled; then up to `max_new` tokens chosen by
    /// `sampler`, stopping at any of `stop`. Returns the reply and how many prompt
    /// tokens were prefilled.
    pub fn reply(
        &self,
        s: &mut ChatSession,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<(Vec<u32>, usize)> {
        if prompt.is_empty() || max_new == 0 {
            return Err(Error::InvalidArgument(
                "an empty prompt, or no token to generate".into(),
            ));
        }
        // At least the last prompt token runs, for its logits.
        let keep = common_prefix(&s.ids, prompt).min(prompt.len() - 1);
        let new = &prompt[keep..];
        let out = match (self, &mut s.cache) {
            (Engine::Cpu(d), SessionCache::Cpu(cache)) => {
                cache.truncate(keep);
                let h = d.forward(new, cache, &mut |_| Ok(()))?;
                let first = sampler.sample(&d.logits(&h[h.len() - d.cfg.d_model..]));
                let mut ws = d.workspace();
                generation_loop(first, max_new, stop, on_token, &mut |t| {
                    Ok(sampler.sample(d.step(t, cache, &mut ws)?))
                })?
            }
            (Engine::Gpu(d), SessionCache::Gpu(cache)) => {
                cache.truncate(keep);
                let first = sampler.sample(&d.prefill(new, cache, d.default_chunk())?);
                generation_loop(first, max_new, stop, on_token, &mut |t| {
                    Ok(sampler.sample(&d.forward(&[t], cache)?))
                })?
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "this session was made by the other engine".into(),
                ));
            }
        };
        s.ids.truncate(keep);
        s.ids.extend_from_slice(new);
        s.ids.extend_from_slice(&out[..out.len() - 1]);
        Ok((out, new.len()))
    }
}
