//! AR model tests: official layout, KV-cache parity, sampler determinism and guidance, training.

use std::collections::BTreeMap;
use std::path::Path;

use spherear_core::keys::all_keys;
use spherear_core::noise::BatchNoise;
use spherear_core::schedule::{em_time_grid, em_update, euler_update, guide, token_plan};
use spherear_core::ModelConfig;
use tch::{Device, Kind, Tensor};
use trainer::ar::{ArModel, KvCache};
use trainer::fit_ar::ArTrainer;
use trainer::optim::Ema;
use trainer::sample::{sample_tokens, SampleRequest};

fn vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1)).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Random-but-trained-looking weights: the head's zero-initialised layers get values so outputs move.
fn randomized(cfg: &ModelConfig, seed: i64) -> ArModel {
    tch::manual_seed(seed);
    let m = ArModel::new(cfg).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in m.vs.variables() {
            if name.contains("ada_ln") || name.contains("final_layer") {
                let _ = t.copy_(&(t.randn_like() * 0.05));
            }
        }
    });
    m
}

#[test]
fn spherear_b_full_model_equals_all_404_official_lines() {
    let cfg = ModelConfig::preset("spherear-b").unwrap();
    let m = ArModel::new(&cfg).unwrap();
    let ours: BTreeMap<String, Vec<i64>> = m.vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/official-state-dict-B.txt"),
    )
    .unwrap();
    let official: Vec<(String, Vec<i64>)> = text
        .lines()
        .map(|l| {
            let (k, s) = l.split_once(' ').unwrap();
            (
                k.to_string(),
                s.trim_matches(|c| c == '[' || c == ']').split(',').map(|d| d.trim().parse().unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(official.len(), 404);
    assert_eq!(ours.len(), 404, "our model has {} tensors", ours.len());
    for (k, s) in &official {
        assert_eq!(ours.get(k), Some(s), "{k}");
    }
    // The core layout (used by import and the exporter) agrees with the tch model too.
    for k in all_keys(&cfg) {
        assert_eq!(ours[&k.name], k.shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
    }
    let ar_params: i64 =
        ours.iter().filter(|(k, _)| !k.starts_with("vae.")).map(|(_, s)| s.iter().product::<i64>()).sum();
    println!("SphereAR-B parameters without the VAE: {ar_params}");
}

#[test]
fn kv_cache_steps_match_the_full_causal_forward() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = randomized(&cfg, 5);
    let (b, l, d) = (3, cfg.num_tokens() as i64, cfg.latent_dim as i64);
    let z = Tensor::randn([b, l, d], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[0i64, 2, cfg.null_class() as i64]);
    let full = tch::no_grad(|| m.ar.conditions(&z, &ids));
    let mut cache = KvCache::new(&cfg, b as usize);
    let mut worst = 0f64;
    tch::no_grad(|| {
        let c0 = m.ar.prefill(&ids, &mut cache);
        worst = worst.max(max_abs(&c0, &full.select(1, 0)));
        for i in 1..l {
            let ci = m.ar.step(&z.select(1, i - 1), i as usize, &mut cache);
            worst = worst.max(max_abs(&ci, &full.select(1, i)));
        }
    });
    println!("KV-cache vs full forward: max abs diff {worst:e}");
    assert!(worst <= 1e-5, "{worst}");
}

fn request(classes: &[i64], cfg: f32, steps: usize, seed: u64, batch: usize) -> SampleRequest {
    SampleRequest { classes: classes.to_vec(), cfg, steps, seed, first_image: 0, batch, token_limit: None }
}

#[test]
fn sampling_is_deterministic_per_seed_and_tokens_lie_on_the_sphere() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = randomized(&cfg, 6);
    let r = cfg.radius() as f64;
    let a = sample_tokens(&m, &request(&[0, 1, 3], 3.0, 3, 7, 2), |_| {}).unwrap();
    let b = sample_tokens(&m, &request(&[0, 1, 3], 3.0, 3, 7, 2), |_| {}).unwrap();
    let split = sample_tokens(&m, &request(&[0, 1, 3], 3.0, 3, 7, 3), |_| {}).unwrap();
    let c = sample_tokens(&m, &request(&[0, 1, 3], 3.0, 3, 8, 3), |_| {}).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0, "same seed must give identical tokens");
    // Another batch split draws the same noise; only BLAS rounding for another batch size may differ.
    assert!(max_abs(&a, &split) <= 1e-5, "batch split changed the tokens");
    assert!(max_abs(&a, &c) > 1e-2, "another seed must differ");
    let norms = a.norm_scalaropt_dim(2, [-1i64].as_slice(), false);
    assert!(f64::try_from((norms - r).abs().max()).unwrap() <= 1e-5);
    let ia = trainer::sample::decode(&m, &a);
    let ib = trainer::sample::decode(&m, &b);
    assert_eq!(max_abs(&ia, &ib), 0.0);
    assert_eq!(ia.size(), vec![3, 3, cfg.image_size as i64, cfg.image_size as i64]);
}

#[test]
fn cfg_one_does_not_double_the_batch_and_guided_velocity_is_the_cfg_blend() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let m = randomized(&cfg, 7);
    let (l, d) = (cfg.num_tokens(), cfg.latent_dim);
    // cfg = 1: the AR model sees only the conditional rows; one noise row per image and token.
    let (stats, _) = trainer::sample::sample_tokens_with_stats(&m, &request(&[1, 2], 1.0, 2, 3, 8), |_| {}).unwrap();
    assert_eq!(stats.max_ar_rows, 2);
    assert_eq!(stats.head_rows, 2 * l * 3);
    let (stats, toks) = trainer::sample::sample_tokens_with_stats(&m, &request(&[1, 2], 3.0, 1, 3, 8), |_| {}).unwrap();
    assert_eq!(stats.max_ar_rows, 4);

    // Token 1 of a guided run by hand: condition from the cached AR pass, noise in the documented order.
    let ids = Tensor::from_slice(&[1i64, 2, cfg.null_class() as i64, cfg.null_class() as i64]);
    let mut cache = KvCache::new(&cfg, 4);
    let grid = em_time_grid(1).unwrap();
    let mut noise = BatchNoise::new(3, 0, 2);
    let mut x0 = vec![0f32; 4 * d];
    let mut skip = vec![0f32; 4 * d];
    noise.draw(&mut x0, d, 2).unwrap(); // token 0: 2 rows per image, unguided
    noise.draw(&mut skip, d, 2).unwrap();
    let t0 = toks.select(1, 0);
    let plan = token_plan(3.0, 1, l);
    assert!(plan.guided && (plan.guidance - (1.0 + 2.0 / l as f32)).abs() < 1e-6);
    let cond1 = tch::no_grad(|| {
        let c0 = m.ar.prefill(&ids, &mut cache);
        let mut x = x0.clone();
        let ce = m.ar.head.embed_condition(&c0);
        let v = vec(&m.ar.head.forward_embedded(
            &Tensor::from_slice(&x).view([4, d as i64]),
            &Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            &ce,
        ));
        em_update(&mut x, &v, &skip, grid.times[0], grid.dt, grid.noise_scales[0]).unwrap();
        let v = vec(&m.ar.head.forward_embedded(
            &Tensor::from_slice(&x).view([4, d as i64]),
            &Tensor::full([4], grid.last_t as f64, (Kind::Float, Device::Cpu)),
            &ce,
        ));
        euler_update(&mut x, &v, grid.last_dt).unwrap();
        spherear_core::sphere::project_rows(&mut x, d, cfg.radius()).unwrap();
        let x0t = Tensor::from_slice(&x).view([4, d as i64]);
        assert!(max_abs(&x0t.narrow(0, 0, 2), &t0) < 1e-6, "token 0 by hand differs");
        m.ar.step(&x0t, 1, &mut cache)
    });
    let ce = tch::no_grad(|| m.ar.head.embed_condition(&cond1));
    let mut x = vec![0f32; 2 * d];
    let mut eps = vec![0f32; 2 * d];
    noise.draw(&mut x, d, 1).unwrap();
    noise.draw(&mut eps, d, 1).unwrap();
    let guided = |x: &[f32], t: f32| {
        let xt = Tensor::from_slice(x).view([2, d as i64]);
        let v = vec(&tch::no_grad(|| {
            m.ar.head.forward_embedded(
                &Tensor::cat(&[&xt, &xt], 0),
                &Tensor::full([4], t as f64, (Kind::Float, Device::Cpu)),
                &ce,
            )
        }));
        // v_u + g·(v_c − v_u), checked element by element against core's guide().
        let mut out = vec![0f32; 2 * d];
        guide(&v[..2 * d], &v[2 * d..], plan.guidance, &mut out).unwrap();
        for k in 0..2 * d {
            let want = v[2 * d + k] + plan.guidance * (v[k] - v[2 * d + k]);
            assert!((out[k] - want).abs() < 1e-6);
        }
        out
    };
    let v = guided(&x, grid.times[0]);
    em_update(&mut x, &v, &eps, grid.times[0], grid.dt, grid.noise_scales[0]).unwrap();
    let v = guided(&x, grid.last_t);
    euler_update(&mut x, &v, grid.last_dt).unwrap();
    spherear_core::sphere::project_rows(&mut x, d, cfg.radius()).unwrap();
    let want = Tensor::from_slice(&x).view([2, d as i64]);
    let diff = max_abs(&want, &toks.select(1, 1));
    assert!(diff < 1e-5, "guided token 1 by hand differs by {diff}");
}

#[test]
fn tiny_ar_loss_falls_and_ema_differs_from_raw_weights() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    tch::manual_seed(11);
    let mut tr = ArTrainer::new(&cfg, None).unwrap();
    let (n, l, d) = (64i64, cfg.num_tokens() as i64, cfg.latent_dim as i64);
    // A structured latent set: each class has its own token pattern plus a little noise, on the sphere.
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(cfg.num_classes as i64);
    let protos = Tensor::randn([cfg.num_classes as i64, l, d], (Kind::Float, Device::Cpu));
    let z = protos.index_select(0, &labels) + Tensor::randn([n, l, d], (Kind::Float, Device::Cpu)) * 0.1;
    let z = trainer::psd::l2_normalize(&z) * cfg.radius() as f64;
    let mut losses = Vec::new();
    for step in 0..300 {
        let idx = Tensor::randint(n, [16], (Kind::Int64, Device::Cpu));
        let lab = tr.drop_labels(&labels.index_select(0, &idx), 0.1);
        let lr = trainer::optim::lr_at(step, 300, 20, 2e-3, 0.1);
        losses.push(tr.step(&z.index_select(0, &idx), &lab, lr, 1.0, Ema { decay: 0.99, warmup: true }));
    }
    let first = losses[..20].iter().sum::<f64>() / 20.0;
    let last = losses[losses.len() - 20..].iter().sum::<f64>() / 20.0;
    println!("tiny AR loss {first:.4} -> {last:.4}");
    assert!(last <= 0.7 * first, "loss fell only from {first} to {last}");
    let raw = trainer::checkpoint::named_tensors(&tr.model.vs, "");
    let diff: f64 = tr.ema.iter().map(|(k, e)| max_abs(e, &raw[k])).fold(0.0, f64::max);
    assert!(diff > 1e-4, "EMA equals raw weights");
}
