//! Where the time of a sampling run goes, shared by the reference sampler (`trainer sample`) and the
//! runtime so that both are timed — and extrapolated — the same way; plus the process's peak memory.
//!
//! Bounded timing: a [`crate::request::SampleRequest`] with `token_limit = Some(n)` samples only the first
//! n tokens of every image. [`Timing::seconds_per_image`] then extrapolates to the full sequence with
//! the measured per-call means: prefill once, (L − 1) AR steps, L tokens of head evaluations and host work
//! (noise, Euler–Maruyama updates, projection), one decoder run per batch. The first tokens attend to fewer
//! keys than the average token, so for the reference sampler (whose attention grows with the position)
//! the extrapolation slightly underestimates the AR time; the exported `ar_step` attends over the whole
//! preallocated cache, so its step time does not depend on the position.

use serde::{Deserialize, Serialize};

/// Seconds spent per stage, summed over all batches of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    pub prefill: f64,
    pub ar_step: f64,
    pub head: f64,
    /// Host-side work per token: noise, Euler–Maruyama/Euler updates, guidance, projection, copies.
    pub host: f64,
    pub decoder: f64,
}

/// Timing of one sampling run (any number of batches of equal size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub images: usize,
    /// Images per batch (before CFG doubling).
    pub batch: usize,
    pub batches: usize,
    /// Tokens per image of the model (L).
    pub num_tokens: usize,
    /// Tokens per image actually sampled (L unless the request had a token limit).
    pub tokens_timed: usize,
    pub stages: StageTimes,
    /// Calls of each graph, summed over batches.
    pub prefill_calls: usize,
    pub ar_step_calls: usize,
    pub head_calls: usize,
    pub decoder_calls: usize,
    /// Peak resident memory of the process during the run, if the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

fn mean(total: f64, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}

impl Timing {
    /// True when fewer than L tokens were sampled and the per-image figures are extrapolated.
    pub fn extrapolated(&self) -> bool {
        self.tokens_timed < self.num_tokens
    }

    /// Per-stage seconds of one full batch (all L tokens), from the measured per-call means.
    pub fn full_batch(&self) -> StageTimes {
        let l = self.num_tokens as f64;
        let tokens_run = (self.tokens_timed * self.batches).max(1) as f64;
        let head_per_token = self.stages.head / tokens_run;
        let host_per_token = self.stages.host / tokens_run;
        StageTimes {
            prefill: mean(self.stages.prefill, self.prefill_calls),
            ar_step: mean(self.stages.ar_step, self.ar_step_calls) * (l - 1.0),
            head: head_per_token * l,
            host: host_per_token * l,
            decoder: mean(self.stages.decoder, self.decoder_calls),
        }
    }

    /// Seconds per image for full images (extrapolated when [`Timing::extrapolated`]), decoder included.
    pub fn seconds_per_image(&self) -> f64 {
        let s = self.full_batch();
        (s.prefill + s.ar_step + s.head + s.host + s.decoder) / self.batch.max(1) as f64
    }

    pub fn images_per_second(&self) -> f64 {
        1.0 / self.seconds_per_image().max(1e-30)
    }

    /// Whether the AR step time can be extrapolated (at least one step was timed when L > 1).
    pub fn complete(&self) -> bool {
        self.prefill_calls > 0 && (self.num_tokens <= 1 || self.ar_step_calls > 0) && self.head_calls > 0
    }
}

/// The value of `key` (a `kB` line such as `VmHWM:` or `MemAvailable:`) of a Linux `/proc` file, in bytes.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(file).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM:")
}

/// Memory the machine can still give without swapping (Linux `MemAvailable`), in bytes.
pub fn available_memory_bytes() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemAvailable:")
}

/// Resets the peak-RSS counter to the current RSS (Linux: `5` to `/proc/self/clear_refs`), so that the
/// next [`peak_rss_bytes`] reports the peak of what follows. Returns false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extrapolation_from_a_token_prefix() {
        // One batch of 4 images, L = 10, 3 tokens timed: 1 prefill, 2 steps, 3 tokens of head work.
        let t = Timing {
            images: 4,
            batch: 4,
            batches: 1,
            num_tokens: 10,
            tokens_timed: 3,
            stages: StageTimes { prefill: 0.5, ar_step: 2.0, head: 3.0, host: 0.3, decoder: 0.4 },
            prefill_calls: 1,
            ar_step_calls: 2,
            head_calls: 33,
            decoder_calls: 1,
            peak_rss_bytes: None,
        };
        assert!(t.extrapolated() && t.complete());
        let f = t.full_batch();
        assert!((f.ar_step - 9.0).abs() < 1e-12); // 1 s per step × 9 steps
        assert!((f.head - 10.0).abs() < 1e-12); // 1 s per token × 10 tokens
        assert!((f.host - 1.0).abs() < 1e-12);
        let want = (0.5 + 9.0 + 10.0 + 1.0 + 0.4) / 4.0;
        assert!((t.seconds_per_image() - want).abs() < 1e-12);
        // Timing all tokens needs no extrapolation and reproduces the measured total.
        let full = Timing {
            tokens_timed: 10,
            ar_step_calls: 9,
            stages: StageTimes { ar_step: 9.0, head: 10.0, host: 1.0, ..t.stages },
            ..t
        };
        assert!(!full.extrapolated());
        assert!((full.seconds_per_image() - want).abs() < 1e-12);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let before = peak_rss_bytes().unwrap();
            assert!(before > 0);
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v);
            assert!(peak_rss_bytes().unwrap() >= before + (32 << 20));
        }
    }
}
