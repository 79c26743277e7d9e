//! Data-parallel training on in-process ranks (`LocalGroup`, threads): every rank ends with the
//! same weights and masks (bit-equal), two runs are bit-equal, and a 2-rank run equals the
//! single-process run with the same global batch up to float summation order — in the
//! dense-mask and the sparse engine. The MPI transport runs the same trainer code (CI runs it
//! under `mpirun -np 2`).

mod common;
use common::fixture;

use models::distributed::LocalGroup;
use models::{EngineKind, MethodName, Silent, Summary, TrainConfig, Trainer};

fn cfg(engine: EngineKind) -> TrainConfig {
    let mut c = TrainConfig {
        epochs: 3,
        batch_size: 50,
        engine,
        ..TrainConfig::default()
    };
    c.method.name = MethodName::Srigl;
    c.method.delta_t = 8;
    c
}

type Vars = Vec<(String, Vec<f32>)>;
type Masks = Vec<(String, sparse_formats::Mask)>;

fn vars(t: &Trainer) -> Vars {
    let mut v: Vars = t
        .variables()
        .unwrap()
        .into_iter()
        .map(|(n, x)| (n, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Trains `c` on `size` in-process ranks; per rank its variables, masks and summary.
fn ranks(c: &TrainConfig, size: usize) -> Vec<(Vars, Masks, Summary)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(size)
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    let t = Trainer::new(c.clone(), fixture(c)).unwrap();
                    let mut t = t.with_collective(Box::new(g)).unwrap();
                    let s = t.run(&mut Silent).unwrap();
                    (vars(&t), t.masks(), s)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_diff(a: &Vars, b: &Vars) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_agree_with_each_other_and_with_one_process() {
    for engine in [EngineKind::DenseMask, EngineKind::Sparse] {
        let c = cfg(engine);
        let two = ranks(&c, 2);
        assert_eq!(
            two[0].0, two[1].0,
            "{engine:?}: ranks hold the same weights"
        );
        assert_eq!(two[0].1, two[1].1, "{engine:?}: ranks hold the same masks");
        let again = ranks(&c, 2);
        assert_eq!(
            two[0].0, again[0].0,
            "{engine:?}: two 2-rank runs are bit-equal"
        );
        let mut one = Trainer::new(c.clone(), fixture(&c)).unwrap();
        let s1 = one.run(&mut Silent).unwrap();
        let d = max_diff(&two[0].0, &vars(&one));
        let (a, b) = (two[0].2.test_accuracy, s1.test_accuracy);
        assert!((a - b).abs() < 0.01, "{engine:?}: accuracy {a} vs {b}");
        if engine == EngineKind::DenseMask {
            // Measured: 1.8e-7 after 60 steps and 7 mask updates; the same masks throughout.
            assert!(d < 1e-5, "{engine:?}: weights differ by {d}");
            assert_eq!(
                two[0].1,
                one.masks(),
                "{engine:?}: same masks as one process"
            );
        } else {
            // The sparse kernels sum a batch of 50 in another order than two shards of 25
            // (measured: the 2-rank sparse run follows the dense-mask runs to 1e-7, the
            // 1-process sparse run differs from them by 5e-4 in the first epoch's loss, as the
            // engine tests allow); near-ties then move a few weights at later updates, so the
            // runs agree in accuracy and ≥ 95% of mask positions (measured 97%).
            for ((n, x), (_, y)) in two[0].1.iter().zip(one.masks()) {
                let overlap = x.overlap(&y).unwrap() as f64 / x.nnz() as f64;
                assert!(overlap >= 0.95, "{n}: {overlap}");
            }
        }
    }
}

#[test]
fn rank_count_and_batch_errors_name_the_setting() {
    let c = cfg(EngineKind::DenseMask);
    // 1,000 examples in batches of 50: fine for 2 ranks; batch 999 leaves a last batch of 1.
    let mut bad = c.clone();
    bad.batch_size = 999;
    let g = LocalGroup::new(2).remove(0);
    let e = Trainer::new(bad.clone(), fixture(&bad))
        .unwrap()
        .with_collective(Box::new(g))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("batch_size") && e.contains("last batch"), "{e}");
    // A checkpoint of a 2-rank run resumes on 2 ranks only.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    std::thread::scope(|s| {
        for g in LocalGroup::new(2) {
            let (c, ck) = (&c, &ck);
            s.spawn(move || {
                let rank0 = models::distributed::Collective::rank(&g) == 0;
                let mut t = Trainer::new(c.clone(), fixture(c))
                    .unwrap()
                    .with_collective(Box::new(g))
                    .unwrap();
                t.run_until(5, &mut Silent).unwrap();
                if rank0 {
                    t.save_checkpoint(ck).unwrap();
                }
            });
        }
    });
    let r = Trainer::resume(&ck, fixture(&c)).unwrap();
    let e = r
        .with_collective(Box::new(models::distributed::SingleProcess))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 rank(s)") && e.contains("got 1"), "{e}");
}
