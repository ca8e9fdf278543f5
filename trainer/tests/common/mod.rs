//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// An ImageFolder with two classes of `per_class` 16×16 PNGs.
pub fn write_image_folder(root: &Path, per_class: usize) {
    for (c, name) in ["circles", "stripes"].iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let v = if c == 0 {
                    let (dx, dy) = (x as i32 - 8, y as i32 - 8);
                    if dx * dx + dy * dy < (3 + i as i32) * (3 + i as i32) {
                        230
                    } else {
                        20
                    }
                } else if (x as usize + i) % 4 < 2 {
                    200
                } else {
                    40
                };
                image::Rgb([v, (v / 2) as u8, 255 - v])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// The trainer binary, single-threaded.
pub fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["--threads", "1"]);
    c
}
