//! A CPU decode step allocates nothing: every heap allocation of the process is
//! counted (a counting global allocator) while decode steps run on a warmed-up
//! workspace and a reserved KV cache, and the count must stay 0. The steps' logits must
//! also equal the allocating forward pass's. Alone in its test binary, so no other test
//! allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use wgsparse::model::decoder::{Decoder, argmax};
use wgsparse::model::gguf::Gguf;
use wgsparse::model::synth::{preset, write_synth};
use wgsparse::quant::GgmlType;
use wgsparse::{Context, Method};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator, counting some of them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `steps` decode steps after `prompt` twice: allocating (`forward` + `logits`)
/// and on a workspace; the second set counted after two warm-up steps.
fn check(dec: &Decoder, prompt: &[u32], steps: usize, what: &str) {
    let dm = dec.cfg.d_model;
    // The allocating path: the reference logits.
    let mut cache = dec.new_cache();
    let h = dec.forward(prompt, &mut cache, &mut |_| Ok(())).unwrap();
    let mut next = argmax(&dec.logits(&h[h.len() - dm..]));
    let mut want = Vec::new();
    for _ in 0..steps + 2 {
        let h = dec.forward(&[next], &mut cache, &mut |_| Ok(())).unwrap();
        let logits = dec.logits(&h);
        next = argmax(&logits);
        want.push(logits);
    }
    // The workspace path.
    let mut cache = dec.new_cache();
    cache.reserve(prompt.len() + steps + 2);
    let h = dec.forward(prompt, &mut cache, &mut |_| Ok(())).unwrap();
    let mut next = argmax(&dec.logits(&h[h.len() - dm..]));
    let mut ws = dec.workspace();
    let mut got = Vec::new();
    for i in 0..steps + 2 {
        if i == 2 {
            ALLOCATIONS.store(0, SeqCst);
            COUNTING.store(true, SeqCst);
        }
        let logits = dec.step(next, &mut cache, &mut ws).unwrap();
        next = argmax(logits);
        // The comparison copies (allocates) outside the counted span.
        let counting = COUNTING.swap(false, SeqCst);
        got.push(logits.to_vec());
        COUNTING.store(counting, SeqCst);
    }
    COUNTING.store(false, SeqCst);
    let n = ALLOCATIONS.load(SeqCst);
    assert_eq!(n, 0, "{what}: {n} allocations in {steps} decode steps");
    assert_eq!(
        got, want,
        "{what}: the steps' logits differ from forward()'s"
    );
}

#[test]
fn cpu_decode_steps_allocate_nothing() {
    wgsparse::runtime::threads::init_cpu_threads(Some(2)).unwrap();
    for (name, ty) in [
        ("tiny-llama", GgmlType::Q4_0),
        ("tiny-qwen2", GgmlType::Q8_0),
        ("tiny-qwen2", GgmlType::F16),
    ] {
        let mut bytes = Vec::new();
        write_synth(&preset(name).unwrap(), ty, 5, &mut bytes).unwrap();
        let g = Gguf::from_bytes(bytes).unwrap();
        let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        check(&dec, &[3, 141, 59, 26, 5], 6, &format!("{name} {ty:?}"));
    }
    // SmallThinker (router before attention, routed ReGLU experts with neuron
    // skipping): in memory, then memory-mapped from a file under a resident cap.
    let mut bytes = Vec::new();
    write_synth(
        &preset("tiny-smallthinker").unwrap(),
        GgmlType::Q4_0,
        5,
        &mut bytes,
    )
    .unwrap();
    let owned = Decoder::load(
        &Gguf::from_bytes(bytes.clone()).unwrap(),
        &Context::cpu(),
        Method::Dense,
    )
    .unwrap();
    check(&owned, &[3, 141, 59, 26, 5], 6, "tiny-smallthinker Q4_0");
    let path = std::env::temp_dir().join(format!("wgsparse-alloc-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let mapped =
        Decoder::load(&Gguf::open(&path).unwrap(), &Context::cpu(), Method::Dense).unwrap();
    let (_, _, total) = mapped.expert_residency();
    mapped.set_max_resident_experts(Some(total / 3));
    check(
        &mapped,
        &[3, 141, 59, 26, 5],
        6,
        "tiny-smallthinker Q4_0, mapped, capped",
    );
    drop(mapped);
    let _ = std::fs::remove_file(&path);
    // Gemma-3 (sliding-window layers, two RoPE bases, post-norms, GELU, soft-capped
    // logits) when the model is here (scripts/fetch-models.sh).
    let gemma = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/models/gemma-3-270m-q4_k_m.gguf"
    );
    if std::path::Path::new(gemma).exists() {
        let g = Gguf::open(gemma).unwrap();
        let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
        check(&dec, &[2, 818, 5279, 529, 7001], 4, "gemma-3-270m");
    } else {
        eprintln!("gemma-3-270m not here: the synthetic models only");
    }
}
