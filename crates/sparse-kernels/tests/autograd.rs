//! The custom ops inside candle's autograd: gradients for x, the stored values and the bias
//! match the dense masked computation on random shapes, for every format.

mod common;

use candle_core::{Device, Tensor, Var};
use common::Rng;
use sparse_formats::NmPattern;
use sparse_kernels::ops::{sparse_linear, sparse_linear_dense_grad, SparseStructure};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    if a.elem_count() == 0 {
        return 0.0;
    }
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Dense twin: W = values scattered through a one-hot placement matrix, so candle's own
/// autograd gives the reference gradient of the values.
fn check(rng: &mut Rng, s: &SparseStructure, batch: usize, lead3: bool) {
    let dev = Device::Cpu;
    let w = s.weight();
    let (rows, fan_in, nnz) = (w.rows(), w.fan_in(), w.nnz());
    let mut place = vec![0.0f32; nnz * rows * fan_in];
    for (i, (r, c)) in w.columns().into_iter().enumerate() {
        place[i * rows * fan_in + r * fan_in + c] = 1.0;
    }
    let place = Tensor::from_vec(place, (nnz, rows * fan_in), &dev).unwrap();
    let values = Var::new(w.values(), &dev).unwrap();
    let bias = Var::new(rng.vec(rows).as_slice(), &dev).unwrap();
    let x_shape: Vec<usize> = if lead3 {
        vec![2, batch, fan_in]
    } else {
        vec![batch, fan_in]
    };
    let n_x: usize = x_shape.iter().product();
    let x =
        Var::from_tensor(&Tensor::from_vec(rng.vec(n_x), x_shape.clone(), &dev).unwrap()).unwrap();
    let mut y_shape = x_shape[..x_shape.len() - 1].to_vec();
    y_shape.push(rows);
    let r = Tensor::from_vec(rng.vec(y_shape.iter().product()), y_shape, &dev).unwrap();

    let y = sparse_linear(x.as_tensor(), values.as_tensor(), s, Some(bias.as_tensor())).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

    let w_dense = values
        .as_tensor()
        .unsqueeze(0)
        .unwrap()
        .matmul(&place)
        .unwrap()
        .reshape((rows, fan_in))
        .unwrap();
    let y_ref = x
        .as_tensor()
        .broadcast_matmul(&w_dense.t().unwrap())
        .unwrap()
        .broadcast_add(bias.as_tensor())
        .unwrap();
    let g_ref = (&y_ref * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let tol = 1e-4;
    assert!(max_diff(&y, &y_ref) < tol, "forward");
    for (name, var) in [("x", &x), ("values", &values), ("bias", &bias)] {
        let (a, b) = (g.get(var).unwrap(), g_ref.get(var).unwrap());
        assert_eq!(a.dims(), b.dims(), "grad {name} shape");
        let d = max_diff(a, b);
        assert!(d < tol, "grad {name}: max difference {d}");
    }
}

#[test]
fn gradients_match_dense_masked_computation() {
    let mut rng = Rng(2024);
    for case in 0..12 {
        let rows = 1 + rng.below(12);
        let fan_in = 1 + rng.below(30);
        let batch = [1, 3, 9, 20][case % 4];
        let k = 1 + rng.below(fan_in);
        let ablate = rng.below(rows);
        let (c, _) = common::condensed(&mut rng, rows, fan_in, k, ablate, true);
        check(&mut rng, &c.into(), batch, case % 3 == 0);
        let (csr, _) = common::csr(&mut rng, rows, fan_in, 0.3);
        check(&mut rng, &csr.into(), batch, false);
        let (n, m) = [(2, 4), (1, 4), (2, 8)][case % 3];
        let nm_fan_in = m * (1 + rng.below(4));
        let (nm, _) = common::nm(&mut rng, rows, nm_fan_in, NmPattern::new(n, m));
        check(&mut rng, &nm.into(), batch, case % 2 == 0);
    }
}

/// The dense-gradient variant: same output and same x/values/bias gradients as
/// `sparse_linear`, the dense weight's values never read, and its gradient `gyᵀ·x`.
#[test]
fn dense_grad_variant_adds_the_dense_weight_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng(77);
    for case in 0..8 {
        let rows = 1 + rng.below(10);
        let fan_in = 1 + rng.below(25);
        let batch = [1, 4, 13, 32][case % 4];
        let s: SparseStructure = if case % 2 == 0 {
            let (k, ablate) = (1 + rng.below(fan_in), rng.below(rows));
            common::condensed(&mut rng, rows, fan_in, k, ablate, true)
                .0
                .into()
        } else {
            common::csr(&mut rng, rows, fan_in, 0.3).0.into()
        };
        let values = Var::new(s.weight().values(), &dev).unwrap();
        let bias = Var::new(rng.vec(rows).as_slice(), &dev).unwrap();
        // Garbage in the dense weight: the forward pass must not read it.
        let dense = Var::from_tensor(
            &Tensor::from_vec(rng.vec(rows * fan_in), (rows, fan_in), &dev).unwrap(),
        )
        .unwrap();
        let x = Var::from_tensor(
            &Tensor::from_vec(rng.vec(2 * batch * fan_in), (2, batch, fan_in), &dev).unwrap(),
        )
        .unwrap();
        let r = Tensor::from_vec(rng.vec(2 * batch * rows), (2, batch, rows), &dev).unwrap();
        let y = sparse_linear_dense_grad(
            x.as_tensor(),
            values.as_tensor(),
            dense.as_tensor(),
            &s,
            Some(bias.as_tensor()),
        )
        .unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let y_ref = sparse_linear(
            x.as_tensor(),
            values.as_tensor(),
            &s,
            Some(bias.as_tensor()),
        )
        .unwrap();
        let g_ref = (&y_ref * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_diff(&y, &y_ref), 0.0, "forward");
        for (name, var) in [("x", &x), ("values", &values), ("bias", &bias)] {
            let d = max_diff(g.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(d < 1e-5, "grad {name}: max difference {d}");
        }
        let want = r
            .reshape((2 * batch, rows))
            .unwrap()
            .t()
            .unwrap()
            .matmul(&x.as_tensor().reshape((2 * batch, fan_in)).unwrap())
            .unwrap();
        let got = g.get(&dense).expect("the dense weight gets a gradient");
        assert_eq!(got.dims(), [rows, fan_in]);
        let d = max_diff(got, &want);
        assert!(d < 1e-4, "dense grad: max difference {d}");
    }
    let (c, _) = common::condensed(&mut rng, 3, 5, 2, 0, false);
    let s: SparseStructure = c.into();
    let values = Tensor::new(s.weight().values(), &dev).unwrap();
    let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros((5, 3), candle_core::DType::F32, &dev).unwrap();
    let err = sparse_linear_dense_grad(&x, &values, &wrong, &s, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [3, 5]"), "{err}");
}

/// Data (a first layer's input) gets no input gradient computed; a tracked input does.
#[test]
fn no_input_gradient_for_data() {
    let dev = Device::Cpu;
    let mut rng = Rng(5);
    let (c, _) = common::condensed(&mut rng, 4, 6, 3, 0, false);
    let s: SparseStructure = c.into();
    let values = Var::new(s.weight().values(), &dev).unwrap();
    let data = Tensor::from_vec(rng.vec(2 * 6), (2, 6), &dev).unwrap();
    let g = sparse_linear(&data, values.as_tensor(), &s, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&data).is_none());
    assert!(g.get(&values).is_some());
    let x = Var::from_tensor(&data).unwrap();
    let g = sparse_linear(x.as_tensor(), values.as_tensor(), &s, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_some());
}

#[test]
fn shape_errors_are_reported() {
    let mut rng = Rng(3);
    let (c, _) = common::condensed(&mut rng, 3, 5, 2, 0, false);
    let s: SparseStructure = c.into();
    let values = Tensor::new(s.weight().values(), &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = sparse_linear(&x, &values, &s, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fan-in is 5"), "{err}");
}
