//! The crate's error type: every fallible public call returns [`Result`].

use thiserror::Error;

/// Everything that can go wrong in wgsparse, as a typed value (never a panic).
#[derive(Debug, Error)]
pub enum Error {
    /// No GPU adapter matched the request (backend, adapter name).
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    /// The backend name given (e.g. in `WGSPARSE_BACKEND`) is not one we know.
    #[error("unknown backend `{0}` (expected auto, vulkan, metal, dx12, gl or cpu)")]
    UnknownBackend(String),
    /// `request_device` failed.
    #[error("could not open the GPU device: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    /// A shape is not acceptable for the operation.
    #[error("invalid shape: {0}")]
    InvalidShape(String),
    /// Two tensors, or a tensor and a plan, do not agree.
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// A tensor of this dtype is not supported here.
    #[error("unsupported dtype {0:?} for {1}")]
    UnsupportedDtype(crate::runtime::dtype::DType, &'static str),
    /// The data does not fit the device even after splitting; says what and by how much.
    #[error("{what} needs {needed} bytes but the device allows {limit} bytes ({over} bytes over)")]
    TooLarge {
        /// What did not fit.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes allowed.
        limit: u64,
        /// `needed - limit`.
        over: u64,
    },
    /// A tensor lives on another context than the plan.
    #[error("tensor belongs to a different context (device) than the plan")]
    WrongContext,
    /// WGSL failed to preprocess, parse or validate.
    #[error("shader `{name}`: {message}")]
    Shader {
        /// Shader family name.
        name: String,
        /// What the preprocessor or naga said.
        message: String,
    },
    /// Mapping a buffer for readback failed.
    #[error("buffer readback failed: {0}")]
    Readback(String),
    /// The GPU reported an error (validation) while running a plan.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The device was lost (driver reset, removal, `destroy`): every plan of this
    /// context fails from now on; build a new [`crate::Context`] (and its plans) to go on.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// The device ran out of memory creating a buffer or running a submission; the
    /// context stays usable for smaller plans.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// An I/O error (reading a data file, writing output).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A GGUF model file is malformed, truncated, or uses something this reader lacks.
    #[error("gguf: {0}")]
    Gguf(String),
    /// A tokenizer could not be built from a model's vocabulary, or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model's architecture or configuration is not one the decoder supports.
    #[error("model: {0}")]
    Model(String),
    /// A data file (Q/K/V file, model file) is malformed or not what was expected.
    #[error("bad file `{path}`: {message}")]
    BadFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A bad argument or configuration value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Input data holding a NaN or an infinity, or a value the storage dtype cannot
    /// hold (beyond ±65504 in f16): refused before any kernel runs on it.
    #[error("{what} element {index} is {value}, not a finite {dtype} value")]
    NonFinite {
        /// Which tensor.
        what: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The value.
        value: f32,
        /// The storage dtype it was meant for (`f32`, `f16`).
        dtype: &'static str,
    },
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors with [`Error::NonFinite`] at the first element of `x` that is not finite, or
/// that `f16` storage would turn into an infinity.
pub fn check_finite(what: &str, x: &[f32], f16: bool) -> Result<()> {
    match x.iter().position(|&v| not_storable(v, f16)) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what: what.into(),
            index,
            value: x[index],
            dtype: if f16 { "f16" } else { "f32" },
        }),
    }
}

/// A NaN, an infinity, or (for f16 storage) a value beyond f16's range.
fn not_storable(v: f32, f16: bool) -> bool {
    const F16_MAX: f32 = 65504.0;
    !v.is_finite() || (f16 && v.abs() > F16_MAX)
}

/// Replaces every value [`check_finite`] would refuse by 0 and returns how many there
/// were: the opt-in alternative to the error (`--nonfinite zero`), for data with a few
/// damaged values; the caller warns with the count.
pub fn zero_non_finite(x: &mut [f32], f16: bool) -> usize {
    let mut n = 0;
    for v in x.iter_mut().filter(|v| not_storable(**v, f16)) {
        *v = 0.0;
        n += 1;
    }
    n
}

impl Error {
    /// Builds a [`Error::TooLarge`] from the needed and allowed sizes.
    pub fn too_large(what: impl Into<String>, needed: u64, limit: u64) -> Self {
        Error::TooLarge {
            what: what.into(),
            needed,
            limit,
            over: needed.saturating_sub(limit),
        }
    }
}
