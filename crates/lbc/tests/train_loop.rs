//! A tiny end-to-end candle loop on synthetic data: LBC, SR-STE and one-shot magnitude at 2:4
//! (pruned at initialisation, and ASP's dense → prune → fine-tune) reach a dense-like loss and
//! end exactly 2:4; ASP's schedule step by step.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss, VarBuilder, VarMap};
use dst_core::optim::{MaskAware, MaskedSgd, SgdConfig};
use dst_core::Rng;
use lbc::lbc::{ScoreOpt, ScoreSgd};
use lbc::schedule::RemovalSchedule;
use lbc::training::{nm_linear, NmLinear, NmMethod, NmSparsifier};
use sparse_formats::NmPattern;

fn data(rng: &mut Rng, n: usize, dim: usize, classes: usize, proj: &[f32]) -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
    let y: Vec<u32> = (0..n)
        .map(|i| {
            (0..classes)
                .map(|c| {
                    (0..dim)
                        .map(|d| x[i * dim + d] * proj[c * dim + d])
                        .sum::<f32>()
                })
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0 as u32
        })
        .collect();
    (
        Tensor::from_vec(x, (n, dim), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, n, &Device::Cpu).unwrap(),
    )
}

/// Trains a 32-128-128-4 MLP; returns (held-out loss, held-out accuracy, the sparsifier).
fn run(method: Option<NmMethod>) -> (f32, f32, Option<NmSparsifier>) {
    let (dim, hidden, classes, epochs, steps) = (32, 128, 4, 10, 25);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let layers: Vec<NmLinear> = vec![
        nm_linear(dim, hidden, 1, vb.pp("fc1")).unwrap(),
        nm_linear(hidden, hidden, 1, vb.pp("fc2")).unwrap(),
        nm_linear(hidden, classes, 1, vb.pp("fc3")).unwrap(),
    ];
    let forward = |x: &Tensor| {
        let h = layers[0].forward(x).unwrap().relu().unwrap();
        let h = layers[1].forward(&h).unwrap().relu().unwrap();
        layers[2].forward(&h).unwrap()
    };
    // The head (4 inputs per group of 128 → fine) is sparsified too, as ASP does for FC layers.
    let mut sp =
        method.map(|m| NmSparsifier::new(layers.clone(), NmPattern::new(2, 4), m).unwrap());
    let mut opt = MaskedSgd::new(
        vm.all_vars(),
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
        },
    )
    .unwrap();
    let mut rng = Rng::new(3);
    let proj: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    let (xt, yt) = data(&mut rng, 1024, dim, classes, &proj);
    for epoch in 0..epochs {
        for _ in 0..steps {
            if let Some(s) = sp.as_mut() {
                s.before_forward(epoch).unwrap();
            }
            let (x, y) = data(&mut rng, 64, dim, classes, &proj);
            let l = loss::cross_entropy(&forward(&x), &y).unwrap();
            let mut g = l.backward().unwrap();
            if let Some(s) = sp.as_mut() {
                s.after_backward(&mut g).unwrap();
            }
            opt.step(&g).unwrap();
        }
    }
    if let Some(s) = sp.as_mut() {
        s.before_forward(epochs).unwrap();
    }
    let logits = forward(&xt);
    let l = loss::cross_entropy(&logits, &yt)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let acc = logits
        .argmax(D::Minus1)
        .unwrap()
        .eq(&yt)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (l, acc, sp)
}

#[test]
fn two_four_methods_reach_a_dense_like_loss() {
    let (dense_loss, dense_acc, _) = run(None);
    let methods = [
        (
            "lbc",
            NmMethod::Lbc {
                schedule: RemovalSchedule {
                    t_i: 0,
                    t_f: 6,
                    power: 3.0,
                },
                scores: ScoreOpt::Sgd(ScoreSgd {
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay: 1e-4,
                    nesterov: false,
                }),
                freeze_scores: true,
                max_scores: 1 << 22,
            },
        ),
        ("sr-ste", NmMethod::SrSte { lambda_w: 2e-4 }),
        ("magnitude at init", NmMethod::OneShot { prune_epoch: 0 }),
        (
            "asp (dense 5 epochs, prune, fine-tune 5)",
            NmMethod::OneShot { prune_epoch: 5 },
        ),
    ];
    for (name, m) in methods {
        let (l, acc, sp) = run(Some(m));
        eprintln!("{name}: loss {l:.4} acc {acc:.3} (dense {dense_loss:.4} / {dense_acc:.3})");
        let sp = sp.unwrap();
        assert!(
            l <= (1.5 * dense_loss).max(dense_loss + 0.15),
            "{name}: loss {l} vs dense {dense_loss}"
        );
        assert!(
            acc >= dense_acc - 0.08,
            "{name}: accuracy {acc} vs dense {dense_acc}"
        );
        // Exactly 2 of every 4 at the end, and exportable.
        for (layer, nm) in sp.export().unwrap() {
            assert_eq!(
                nm.values().len() * 2,
                nm.rows() * nm.fan_in(),
                "{name} {layer}"
            );
        }
        for (layer, mask) in sp.masks() {
            assert_eq!(mask.density(), 0.5, "{name} {layer}");
        }
    }
}

/// A conv layer under LBC: groups run along input channels at one kernel position, and the
/// final mask is exactly 2:4 on that axis.
#[test]
fn lbc_on_a_conv_layer_groups_input_channels() {
    use candle_nn::Conv2dConfig;
    use lbc::training::nm_conv2d;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let conv = nm_conv2d(
        8,
        6,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        2,
        vb.pp("conv"),
    )
    .unwrap();
    let method = NmMethod::Lbc {
        schedule: RemovalSchedule {
            t_i: 0,
            t_f: 3,
            power: 3.0,
        },
        scores: ScoreOpt::Sgd(ScoreSgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
        }),
        freeze_scores: true,
        max_scores: 1 << 20,
    };
    let mut sp = NmSparsifier::new(vec![conv.clone()], NmPattern::new(2, 4), method).unwrap();
    let mut opt = MaskedSgd::new(
        vm.all_vars(),
        // Weight decay as written before the default became 1e-4.
        SgdConfig {
            weight_decay: 5e-4,
            ..SgdConfig::default()
        },
    )
    .unwrap();
    let mut rng = Rng::new(5);
    for epoch in 0..4 {
        for _ in 0..3 {
            sp.before_forward(epoch).unwrap();
            let x = Tensor::from_vec(
                (0..2 * 8 * 25).map(|_| rng.normal() as f32).collect(),
                (2, 8, 5, 5),
                &Device::Cpu,
            )
            .unwrap();
            let l = conv.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
            let mut g = l.backward().unwrap();
            sp.after_backward(&mut g).unwrap();
            opt.step(&g).unwrap();
        }
    }
    sp.before_forward(4).unwrap();
    let (_, nm) = sp.export().unwrap().remove(0);
    assert_eq!(
        nm.pattern(),
        NmPattern {
            n: 2,
            m: 4,
            group_stride: 9
        }
    );
    // Per output channel and kernel position, 2 of every 4 consecutive input channels.
    let mask = nm.to_mask();
    for o in 0..6 {
        for pos in 0..9 {
            for block in 0..2 {
                let kept = (0..4)
                    .filter(|&c| mask.get(o, (block * 4 + c) * 9 + pos))
                    .count();
                assert_eq!(kept, 2);
            }
        }
    }
}

/// ASP's schedule in the sparsifier: the mask stays dense (all ones, gradients untouched) before
/// the prune epoch, is the N:M magnitude mask of the weights as trained up to then at the prune
/// epoch's first forward pass, and never changes afterwards, whatever the weights do; the
/// "started" flag that a checkpoint carries says whether the prune happened.
#[test]
fn asp_trains_dense_prunes_the_trained_weights_once_then_keeps_the_mask() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let layer = nm_linear(16, 6, 7, vb.pp("fc")).unwrap();
    let pattern = NmPattern::new(2, 4);
    let mut sp = NmSparsifier::new(
        vec![layer.clone()],
        pattern,
        NmMethod::OneShot { prune_epoch: 2 },
    )
    .unwrap();
    let mut rng = Rng::new(11);
    let mut redraw = || {
        let w: Vec<f32> = (0..96).map(|_| rng.normal() as f32).collect();
        layer
            .weight()
            .set(&Tensor::from_vec(w.clone(), (6, 16), &Device::Cpu).unwrap())
            .unwrap();
        w
    };
    for epoch in 0..2 {
        redraw();
        sp.before_forward(epoch).unwrap();
        assert!(!sp.state().started, "epoch {epoch}");
        assert_eq!(
            sp.masks()[0].1.density(),
            1.0,
            "dense before the prune epoch"
        );
        // Gradients pass untouched while dense.
        let x = Tensor::ones((3, 16), DType::F32, &Device::Cpu).unwrap();
        let mut g = layer
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let before = g
            .get(layer.weight())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        sp.after_backward(&mut g).unwrap();
        let after = g
            .get(layer.weight())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(before, after);
    }
    let trained = redraw();
    sp.before_forward(2).unwrap();
    let expect = lbc::baselines::magnitude_mask(&trained, 6, 16, pattern).unwrap();
    assert!(sp.state().started);
    assert_eq!(
        sp.masks()[0].1,
        expect,
        "pruned from the weights trained so far"
    );
    for epoch in 3..6 {
        redraw();
        sp.before_forward(epoch).unwrap();
        assert_eq!(
            sp.masks()[0].1,
            expect,
            "fixed while fine-tuning (epoch {epoch})"
        );
    }
    assert_eq!(lbc::baselines::default_prune_epoch(20), 10);
    assert_eq!(lbc::baselines::default_prune_epoch(1), 0);
}
