//! Progress bars for long work (hidden when disabled or when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `total` steps starting at `pos`, showing elapsed time, ETA, steps/s and a message.
pub fn bar(total: u64, pos: u64, prefix: &str, enabled: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !enabled {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style =
        ProgressStyle::with_template("{prefix} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(prefix.to_string());
    pb.set_position(pos);
    pb.reset_eta();
    pb
}
