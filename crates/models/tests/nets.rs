//! Every architecture builds with both layer kinds, holds `ModelConfig::variable_count` numbers,
//! maps `[b, c, h, w]` to `[b, classes]`, and back-propagates to every weight; bad shapes are
//! errors naming the model.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use models::nets::{LayerKind, ModelConfig, Network};

fn check(cfg: &ModelConfig, image: [usize; 3], kind: LayerKind, weights: usize) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let (net, built) = Network::build(cfg, image, 10, vb, kind, 3).unwrap();
    let n = match kind {
        LayerKind::Dst | LayerKind::Engine => built.sparse.len(),
        LayerKind::Nm => built.nm.len(),
    };
    assert_eq!(n, weights, "{cfg:?}");
    // The count a model-file loader checks before building equals what was built (N:M layers
    // add their learned scores, which files do not carry).
    if kind != LayerKind::Nm {
        let built_count: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(
            cfg.variable_count(image, 10),
            built_count as u128,
            "{cfg:?} {image:?}"
        );
    }
    let [c, h, w] = image;
    let vals: Vec<f32> = (0..2 * c * h * w)
        .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let x = Tensor::from_vec(vals, (2, c, h, w), &Device::Cpu).unwrap();
    let y = net.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[2, 10]);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let weight_vars: Vec<_> = match kind {
        LayerKind::Dst | LayerKind::Engine => {
            built.sparse.iter().map(|p| p.var().clone()).collect()
        }
        LayerKind::Nm => built.nm.iter().map(|l| l.weight().clone()).collect(),
    };
    let missing: Vec<_> = weight_vars
        .iter()
        .filter(|v| grads.get(v).is_none())
        .map(|v| v.dims().to_vec())
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    for v in weight_vars {
        let g = grads.get(&v).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{cfg:?}: zero gradient");
    }
    // Eval mode works too and is deterministic.
    let a = net.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let b = net.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn mlp_and_lenet5() {
    for kind in [LayerKind::Dst, LayerKind::Nm] {
        check(&ModelConfig::lenet_300_100(), [1, 28, 28], kind, 3);
        check(&ModelConfig::Lenet5, [1, 28, 28], kind, 5);
    }
    check(&ModelConfig::mlp_1000x3(), [1, 28, 28], LayerKind::Dst, 4);
    // Sparse-engine layers run densely until compressed: same shapes and gradients.
    check(&ModelConfig::Lenet5, [1, 28, 28], LayerKind::Engine, 5);
    check(&ModelConfig::Lenet5, [3, 32, 32], LayerKind::Dst, 5);
}

#[test]
fn resnet18_small_width() {
    // 1 stem + 8 blocks × 2 convs + 3 shortcuts + fc = 21 weights.
    let cfg = ModelConfig::Resnet18 { width: 4 };
    check(&cfg, [3, 32, 32], LayerKind::Dst, 21);
    check(&cfg, [3, 32, 32], LayerKind::Nm, 21);
}

#[test]
fn vit_tiny() {
    let cfg = ModelConfig::Vit {
        patch: 8,
        dim: 16,
        depth: 2,
        heads: 2,
        mlp_dim: 32,
    };
    // embed + 2 × (qkv, proj, fc1, fc2) + head.
    check(&cfg, [3, 32, 32], LayerKind::Dst, 10);
    check(
        &cfg,
        [1, 28, 28].map(|d| if d == 28 { 32 } else { d }),
        LayerKind::Nm,
        10,
    );
}

#[test]
fn presets_and_bad_shapes() {
    for p in ModelConfig::PRESETS {
        assert!(ModelConfig::preset(p).is_some(), "{p}");
    }
    assert!(ModelConfig::preset("alexnet").is_none());
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let bad_patch = ModelConfig::Vit {
        patch: 5,
        dim: 16,
        depth: 1,
        heads: 2,
        mlp_dim: 8,
    };
    let e = Network::build(&bad_patch, [1, 28, 28], 10, vb.clone(), LayerKind::Dst, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("patch 5"), "{e}");
    let e = Network::build(&ModelConfig::Lenet5, [1, 20, 20], 10, vb, LayerKind::Dst, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lenet5") && e.contains("20×20"), "{e}");
}

#[test]
fn same_seed_same_network() {
    let build = |seed| {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let (_, built) = Network::build(
            &ModelConfig::Lenet5,
            [1, 28, 28],
            10,
            vb,
            LayerKind::Dst,
            seed,
        )
        .unwrap();
        built
            .sparse
            .iter()
            .map(|p| p.weights().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(build(5), build(5));
    assert_ne!(build(5), build(6));
}
