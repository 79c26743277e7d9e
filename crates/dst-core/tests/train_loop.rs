//! A tiny end-to-end candle training loop: SRigL at 90% learns a synthetic task, with every
//! invariant checked at every step.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Conv2dConfig;
use candle_nn::{loss, VarBuilder, VarMap};
use dst_core::layers::{sparse_conv2d, sparse_linear, SparseLinear};
use dst_core::optim::{MaskAware, MaskedSgd, SgdConfig};
use dst_core::{Method, Rng, Sparsifier, SparsifierConfig};

struct Net {
    l: Vec<SparseLinear>,
}

impl Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.l.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.l.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Labels = argmax of a fixed random projection: learnable, not trivial.
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

fn accuracy(logits: &Tensor, y: &Tensor) -> f32 {
    let pred = logits.argmax(D::Minus1).unwrap();
    pred.eq(y)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn srigl_90_learns_and_keeps_its_invariants() {
    let (dim, hidden, classes, steps) = (32, 256, 4, 400);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let net = Net {
        l: vec![
            sparse_linear(dim, hidden, 1, vb.pp("fc1")).unwrap(),
            sparse_linear(hidden, hidden, 1, vb.pp("fc2")).unwrap(),
            sparse_linear(hidden, classes, 1, vb.pp("fc3")).unwrap(),
        ],
    };
    let mut cfg = SparsifierConfig::new(Method::Srigl, 0.9, steps);
    cfg.schedule.delta_t = 25;
    cfg.seed = 7;
    let params: Vec<_> = net.l.iter().map(|l| l.weight().clone()).collect();
    let mut sp = Sparsifier::new(params.clone(), cfg).unwrap();
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
    };
    let mut opt = MaskedSgd::new(vm.all_vars(), sgd).unwrap();
    sp.register(&mut opt).unwrap();

    let mut rng = Rng::new(3);
    let proj: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    let (xt, yt) = data(&mut rng, 512, dim, classes, &proj);
    let mut first_loss = None;
    let mut updates = 0;
    let mut last_loss = 0.0;
    for step in 1..=steps {
        let (x, y) = data(&mut rng, 64, dim, classes, &proj);
        let loss = loss::cross_entropy(&net.forward(&x).unwrap(), &y).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        first_loss.get_or_insert(l);
        last_loss = l;
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        if sp.step(step, &grads, &mut opt).unwrap().is_some() {
            updates += 1;
        }
        // Invariants at every step.
        for (p, b) in params.iter().zip(sp.budgets()) {
            let m = p.mask();
            let w = p.weights().unwrap();
            assert!(
                w.iter().zip(m.as_slice()).all(|(&v, &a)| a || v == 0.0),
                "{} has an inactive non-zero",
                p.name()
            );
            for s in opt.state(p.var()) {
                let s = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    s.iter().zip(m.as_slice()).all(|(&v, &a)| a || v == 0.0),
                    "{} has optimizer state at an inactive weight",
                    p.name()
                );
            }
            if !b.dense {
                let counts: Vec<usize> = m.row_counts().into_iter().filter(|&c| c > 0).collect();
                assert!(
                    counts.windows(2).all(|c| c[0] == c[1]),
                    "{}: fan-in not constant",
                    p.name()
                );
                assert!(m.nnz() <= b.budget);
            }
        }
    }
    assert_eq!(updates, 11, "updates at 25, 50, ..., 275 (< T_end = 300)");
    let acc = accuracy(&net.forward(&xt).unwrap(), &yt);
    let first = first_loss.unwrap();
    assert!(last_loss < 0.6 * first, "loss {first} → {last_loss}");
    assert!(acc > 0.75, "held-out accuracy {acc}");
    assert!(
        (sp.global_sparsity() - 0.9).abs() < 0.01,
        "sparsity {}",
        sp.global_sparsity()
    );
    assert!(sp.itop() > 0.1);
}

#[test]
fn same_seed_same_masks() {
    let run = || {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let l1 = sparse_linear(16, 32, 2, vb.pp("a")).unwrap();
        let l2 = sparse_linear(32, 3, 2, vb.pp("b")).unwrap();
        let mut cfg = SparsifierConfig::new(Method::Rigl, 0.8, 40);
        cfg.schedule.delta_t = 5;
        let mut sp = Sparsifier::new(vec![l1.weight().clone(), l2.weight().clone()], cfg).unwrap();
        let mut opt = MaskedSgd::new(
            vm.all_vars(),
            // Weight decay as written before the default became 1e-4.
            SgdConfig {
                weight_decay: 5e-4,
                ..SgdConfig::default()
            },
        )
        .unwrap();
        sp.register(&mut opt).unwrap();
        let mut rng = Rng::new(1);
        for step in 1..=30 {
            let x = Tensor::from_vec(
                (0..8 * 16).map(|_| rng.normal() as f32).collect(),
                (8, 16),
                &Device::Cpu,
            )
            .unwrap();
            let loss = l2
                .forward(&l1.forward(&x).unwrap().relu().unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let g = loss.backward().unwrap();
            opt.step(&g).unwrap();
            sp.step(step, &g, &mut opt).unwrap();
        }
        (l1.weight().mask(), l1.weight().weights().unwrap())
    };
    assert_eq!(run(), run());
}

/// A conv layer under SRigL: the `[out, in·kh·kw]` view gets a constant fan-in and training
/// steps keep it.
#[test]
fn srigl_on_a_conv_layer() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let conv = sparse_conv2d(
        4,
        16,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        3,
        vb.pp("conv"),
    )
    .unwrap();
    let head = sparse_linear(16 * 6 * 6, 3, 3, vb.pp("head")).unwrap();
    let mut cfg = SparsifierConfig::new(Method::Srigl, 0.7, 40);
    cfg.schedule.delta_t = 5;
    cfg.distribution = dst_core::Distribution::Uniform;
    let mut sp = Sparsifier::new(vec![conv.weight().clone(), head.weight().clone()], cfg).unwrap();
    let mut opt = MaskedSgd::new(
        vm.all_vars(),
        // Weight decay as written before the default became 1e-4.
        SgdConfig {
            weight_decay: 5e-4,
            ..SgdConfig::default()
        },
    )
    .unwrap();
    sp.register(&mut opt).unwrap();
    let mut rng = Rng::new(4);
    let mut reports = 0;
    for step in 1..=20 {
        let x = Tensor::from_vec(
            (0..2 * 4 * 36).map(|_| rng.normal() as f32).collect(),
            (2, 4, 6, 6),
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let h = conv
            .forward(&x)
            .unwrap()
            .relu()
            .unwrap()
            .flatten_from(1)
            .unwrap();
        let loss = loss::cross_entropy(&head.forward(&h).unwrap(), &y).unwrap();
        let g = loss.backward().unwrap();
        opt.step(&g).unwrap();
        if let Some(r) = sp.step(step, &g, &mut opt).unwrap() {
            reports += 1;
            assert!(r.layers[0].stats.fan_in.is_some());
        }
        let m = conv.weight().mask();
        assert_eq!((m.rows(), m.fan_in()), (16, 36));
        let counts: Vec<usize> = m.row_counts().into_iter().filter(|&c| c > 0).collect();
        assert!(
            counts.windows(2).all(|c| c[0] == c[1]),
            "constant fan-in on the conv view"
        );
    }
    assert_eq!(reports, 4, "updates at 5, 10, 15, 20 (< T_end = 30)");
}

/// Dense-gradient accumulation (`grad_accumulation = 3`, ΔT = 10): the update at step 10 grows
/// by the mean of the dense gradients of steps 8, 9 and 10 — the same masks as a sparsifier
/// without accumulation handed that mean at step 10 — and not by step 10's alone; steps outside
/// the window are not read. RigL and SRigL alike.
#[test]
fn gradient_accumulation_grows_by_the_window_mean() {
    for method in [Method::Rigl, Method::Srigl] {
        let build = |n: usize| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let l = sparse_linear(24, 12, 3, vb.pp("a")).unwrap();
            let mut cfg = SparsifierConfig::new(method, 0.8, 1000);
            cfg.schedule.delta_t = 10;
            cfg.schedule.grad_accumulation = n;
            let sp = Sparsifier::new(vec![l.weight().clone()], cfg).unwrap();
            let opt = MaskedSgd::new(vm.all_vars(), SgdConfig::default()).unwrap();
            (l, sp, opt)
        };
        let mut rng = Rng::new(5);
        let mut draw = || -> Vec<f32> { (0..12 * 24).map(|_| rng.normal() as f32).collect() };
        let gs: Vec<Vec<f32>> = (0..4).map(|_| draw()).collect();
        // A gradient store holding `g` for the layer's weight.
        let store = |l: &SparseLinear, g: &[f32]| {
            let t = Tensor::from_slice(g, (12, 24), &Device::Cpu).unwrap();
            (l.weight().var().as_tensor() * t)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (la, mut a, mut oa) = build(3);
        // Step 7 is outside the window: its gradient must not count.
        for (step, g) in [(7, &gs[3]), (8, &gs[0]), (9, &gs[1])] {
            assert_eq!(a.step(step, &store(&la, g), &mut oa).unwrap(), None);
        }
        assert!(a.step(10, &store(&la, &gs[2]), &mut oa).unwrap().is_some());
        let mean: Vec<f32> = (0..gs[0].len())
            .map(|i| (gs[0][i] + gs[1][i] + gs[2][i]) / 3.0)
            .collect();
        let (lb, mut b, mut ob) = build(1);
        b.step(10, &store(&lb, &mean), &mut ob).unwrap().unwrap();
        assert_eq!(la.weight().mask(), lb.weight().mask(), "{method:?}");
        let (lc, mut c, mut oc) = build(1);
        c.step(10, &store(&lc, &gs[2]), &mut oc).unwrap().unwrap();
        assert_ne!(la.weight().mask(), lc.weight().mask(), "{method:?}");
    }
}
