//! Synthetic activations with SAE-like structure, for tests, benchmarks and examples:
//! each row is a sparse non-negative combination of random unit "true features", plus
//! a constant offset and Gaussian noise, so a good SAE really can explain most of the
//! variance and dead/alive latents behave as on real data.

use saelab_core::rng::Rng;

/// `rows` x `d` activations built from `n_features` random unit directions, each row
/// using about `active` of them with exponential magnitudes; noise std `noise`.
pub fn sparse_mixture(
    rows: usize,
    d: usize,
    n_features: usize,
    active: usize,
    noise: f32,
    seed: u64,
) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut feats = vec![0f32; n_features * d];
    rng.fill_normal(&mut feats, 1.0);
    for f in feats.chunks_exact_mut(d) {
        let n = f.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        f.iter_mut().for_each(|v| *v /= n);
    }
    let mut offset = vec![0f32; d];
    rng.fill_normal(&mut offset, 0.5);
    let mut x = vec![0f32; rows * d];
    for row in x.chunks_exact_mut(d) {
        row.copy_from_slice(&offset);
        for _ in 0..active.max(1) * 2 {
            // Features are drawn with a skewed frequency: low indices more often.
            let u = rng.f64();
            let j = ((u * u) * n_features as f64) as usize % n_features.max(1);
            // Half of the 2*active draws are kept: about `active` features per row.
            if rng.f64() < 0.5 {
                let a = -(1.0 - rng.f64()).ln() as f32;
                for (r, f) in row.iter_mut().zip(&feats[j * d..(j + 1) * d]) {
                    *r += a * f;
                }
            }
        }
        for r in row.iter_mut() {
            *r += noise * rng.normal();
        }
    }
    x
}
