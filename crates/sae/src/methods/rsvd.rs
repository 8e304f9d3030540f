//! Randomized truncated SVD (Halko, Martinsson & Tropp 2011: range finder with power
//! iterations) over an abstract linear operator, plus a cyclic Jacobi symmetric
//! eigensolver in f64 that finishes the small projected problem and serves as the
//! exact reference in tests.
//!
//! Method 2 uses it on the sparse co-activation (interference) statistics and on the
//! decoder matrix; neither is ever formed as a dense F x F matrix.

use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_core::rng::Rng;

/// A linear operator `A` (rows x cols) applied to blocks of `l` column vectors stored
/// row-major: `apply(x: cols x l) -> rows x l`, `apply_t(y: rows x l) -> cols x l`.
pub trait LinOp: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn apply(&self, x: &[f32], l: usize, out: &mut [f32]);
    fn apply_t(&self, y: &[f32], l: usize, out: &mut [f32]);
}

/// A dense row-major matrix (e.g. the decoder, F x d_in), applied with the GEMM.
pub struct DenseOp<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl LinOp for DenseOp<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn apply(&self, x: &[f32], l: usize, out: &mut [f32]) {
        let a = MatRef::row_major(self.data, self.rows, self.cols);
        gemm(
            1.0,
            a,
            MatRef::row_major(x, self.cols, l),
            0.0,
            MatMut::row_major(out, self.rows, l),
        );
    }
    fn apply_t(&self, y: &[f32], l: usize, out: &mut [f32]) {
        let a = MatRef::row_major(self.data, self.rows, self.cols).t();
        gemm(
            1.0,
            a,
            MatRef::row_major(y, self.rows, l),
            0.0,
            MatMut::row_major(out, self.cols, l),
        );
    }
}

/// A symmetric sparse matrix in CSR form (both triangles stored), n x n.
#[derive(Clone, Debug, Default)]
pub struct SparseSymOp {
    pub n: usize,
    pub offsets: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

impl SparseSymOp {
    /// From upper-triangle triplets `(i, j, v)` with `i < j` (each pair once); the
    /// matrix stores both `(i, j)` and `(j, i)`, so it is exactly symmetric.
    pub fn from_upper(n: usize, triplets: &[(u32, u32, f32)]) -> SparseSymOp {
        let (offsets, sides) = Self::sides(n, triplets);
        SparseSymOp {
            n,
            offsets,
            idx: sides.iter().map(|&(b, _)| b).collect(),
            val: sides.iter().map(|&(_, k)| triplets[k as usize].2).collect(),
        }
    }

    /// The CSR layout of [`SparseSymOp::from_upper`] without the values: both sides of
    /// every triplet grouped by row with a counting sort, row `l`'s entries being
    /// `sides[offsets[l]..offsets[l + 1]]`, each `(column, triplet index)`, in triplet
    /// order within a row.
    pub fn sides(n: usize, triplets: &[(u32, u32, f32)]) -> (Vec<usize>, Vec<(u32, u32)>) {
        let mut offsets = vec![0usize; n + 1];
        for &(i, j, _) in triplets {
            offsets[i as usize + 1] += 1;
            offsets[j as usize + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut fill = offsets.clone();
        let mut sides = vec![(0u32, 0u32); offsets[n]];
        for (k, &(i, j, _)) in triplets.iter().enumerate() {
            for (a, b) in [(i, j), (j, i)] {
                sides[fill[a as usize]] = (b, k as u32);
                fill[a as usize] += 1;
            }
        }
        (offsets, sides)
    }
}

impl LinOp for SparseSymOp {
    fn rows(&self) -> usize {
        self.n
    }
    fn cols(&self) -> usize {
        self.n
    }
    fn apply(&self, x: &[f32], l: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        out.par_chunks_mut(l).enumerate().for_each(|(i, o)| {
            o.iter_mut().for_each(|v| *v = 0.0);
            for q in self.offsets[i]..self.offsets[i + 1] {
                let (j, a) = (self.idx[q] as usize, self.val[q]);
                for (ov, xv) in o.iter_mut().zip(&x[j * l..(j + 1) * l]) {
                    *ov += a * xv;
                }
            }
        });
    }
    fn apply_t(&self, y: &[f32], l: usize, out: &mut [f32]) {
        self.apply(y, l, out)
    }
}

/// Truncated SVD `A ~ U diag(s) V^T`: `u` rows x r, `v` cols x r (row-major), `s`
/// descending.
#[derive(Clone, Debug)]
pub struct Svd {
    pub rank: usize,
    pub u: Vec<f32>,
    pub s: Vec<f64>,
    pub v: Vec<f32>,
}

/// f64 dot product with 4 independent accumulators (a single accumulator is
/// latency-bound on long columns).
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Orthonormalise the `l` columns of a row-major `m x l` block in place (modified
/// Gram-Schmidt in f64, twice for stability). Columns that collapse to zero stay zero.
fn orthonormalize(y: &mut [f32], m: usize, l: usize) {
    let mut cols: Vec<Vec<f64>> = (0..l)
        .map(|c| (0..m).map(|r| y[r * l + c] as f64).collect())
        .collect();
    for _pass in 0..2 {
        for c in 0..l {
            let (done, rest) = cols.split_at_mut(c);
            let cur = &mut rest[0];
            for prev in done.iter() {
                let d = dot64(prev, cur);
                cur.iter_mut().zip(prev).for_each(|(x, p)| *x -= d * p);
            }
            let n = dot64(cur, cur).sqrt();
            if n > 1e-30 {
                cur.iter_mut().for_each(|x| *x /= n);
            } else {
                cur.iter_mut().for_each(|x| *x = 0.0);
            }
        }
    }
    for (c, col) in cols.iter().enumerate() {
        for r in 0..m {
            y[r * l + c] = col[r] as f32;
        }
    }
}

/// Rank-`rank` randomized SVD with `oversample` extra probe vectors and
/// `power_iters` power iterations (each re-orthonormalised), probes drawn from `rng`.
pub fn randomized_svd(
    op: &dyn LinOp,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    rng: &mut Rng,
) -> Svd {
    let (m, n) = (op.rows(), op.cols());
    let l = (rank + oversample).min(m).min(n).max(1);
    let rank = rank.min(l);
    let mut omega = vec![0f32; n * l];
    rng.fill_normal(&mut omega, 1.0);
    let mut y = vec![0f32; m * l];
    op.apply(&omega, l, &mut y);
    orthonormalize(&mut y, m, l);
    let mut z = omega;
    for _ in 0..power_iters {
        op.apply_t(&y, l, &mut z);
        orthonormalize(&mut z, n, l);
        op.apply(&z, l, &mut y);
        orthonormalize(&mut y, m, l);
    }
    // B^T = A^T Q (n x l); G = B B^T = (B^T)^T B^T (l x l).
    op.apply_t(&y, l, &mut z);
    let mut g = vec![0f64; l * l];
    for r in 0..n {
        let row = &z[r * l..(r + 1) * l];
        for a in 0..l {
            let ra = row[a] as f64;
            for b in a..l {
                g[a * l + b] += ra * row[b] as f64;
            }
        }
    }
    for a in 0..l {
        for b in 0..a {
            g[a * l + b] = g[b * l + a];
        }
    }
    let (vals, vecs) = jacobi_eigen(&g, l);
    // U = Q W, V = B^T W / s.
    let mut u = vec![0f32; m * rank];
    let mut v = vec![0f32; n * rank];
    let s: Vec<f64> = vals[..rank].iter().map(|&x| x.max(0.0).sqrt()).collect();
    for r in 0..m {
        for k in 0..rank {
            let mut acc = 0f64;
            for c in 0..l {
                acc += y[r * l + c] as f64 * vecs[c * l + k];
            }
            u[r * rank + k] = acc as f32;
        }
    }
    for r in 0..n {
        for k in 0..rank {
            if s[k] > 0.0 {
                let mut acc = 0f64;
                for c in 0..l {
                    acc += z[r * l + c] as f64 * vecs[c * l + k];
                }
                v[r * rank + k] = (acc / s[k]) as f32;
            }
        }
    }
    Svd { rank, u, s, v }
}

/// Eigen-decomposition of a symmetric `n x n` matrix (row-major, f64) by cyclic Jacobi
/// rotations. Returns eigenvalues in descending order and the matching eigenvectors as
/// the columns of a row-major `n x n` matrix.
pub fn jacobi_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum::<f64>().max(1e-300);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]).then(x.cmp(&y)));
    let vals = order.iter().map(|&k| a[k * n + k]).collect();
    let mut vecs = vec![0f64; n * n];
    for (newk, &k) in order.iter().enumerate() {
        for r in 0..n {
            vecs[r * n + newk] = v[r * n + k];
        }
    }
    (vals, vecs)
}

/// Exact singular values of a dense row-major `m x n` matrix via the eigenvalues of
/// `A^T A` in f64 (the reference for tests; O(m n^2 + n^3)).
pub fn exact_singular_values(a: &[f32], m: usize, n: usize) -> Vec<f64> {
    let mut g = vec![0f64; n * n];
    for r in 0..m {
        for i in 0..n {
            let ai = a[r * n + i] as f64;
            for j in 0..n {
                g[i * n + j] += ai * a[r * n + j] as f64;
            }
        }
    }
    jacobi_eigen(&g, n)
        .0
        .into_iter()
        .map(|x| x.max(0.0).sqrt())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_symmetric_matrix() {
        let mut rng = Rng::new(1);
        let n = 9;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let x = rng.normal() as f64;
                a[i * n + j] = x;
                a[j * n + i] = x;
            }
        }
        let (vals, vecs) = jacobi_eigen(&a, n);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..n {
            for j in 0..n {
                let r: f64 = (0..n)
                    .map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k])
                    .sum();
                assert!((r - a[i * n + j]).abs() < 1e-9, "{r} vs {}", a[i * n + j]);
            }
        }
    }

    /// A matrix with a decaying spectrum: low-rank signal plus small noise.
    fn test_matrix(rng: &mut Rng, m: usize, n: usize) -> Vec<f32> {
        let mut a = vec![0f32; m * n];
        for k in 0..12 {
            let s = 10.0 * 0.7f32.powi(k);
            let u: Vec<f32> = (0..m).map(|_| rng.normal()).collect();
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            for i in 0..m {
                for j in 0..n {
                    a[i * n + j] += s * u[i] * v[j] / ((m * n) as f32).sqrt();
                }
            }
        }
        for x in a.iter_mut() {
            *x += 0.001 * rng.normal();
        }
        a
    }

    #[test]
    fn randomized_svd_matches_exact_dense() {
        let mut rng = Rng::new(2);
        let (m, n) = (120, 60);
        let a = test_matrix(&mut rng, m, n);
        let exact = exact_singular_values(&a, m, n);
        let svd = randomized_svd(
            &DenseOp {
                data: &a,
                rows: m,
                cols: n,
            },
            8,
            8,
            2,
            &mut Rng::new(3),
        );
        for k in 0..8 {
            assert!(
                (svd.s[k] - exact[k]).abs() < 1e-3 * exact[0],
                "k {k}: {} vs {}",
                svd.s[k],
                exact[k]
            );
        }
        // A v_k = s_k u_k.
        for k in 0..3 {
            for i in 0..m {
                let av: f64 = (0..n)
                    .map(|j| a[i * n + j] as f64 * svd.v[j * 8 + k] as f64)
                    .sum();
                assert!((av - svd.s[k] * svd.u[i * 8 + k] as f64).abs() < 1e-3 * svd.s[0]);
            }
        }
    }

    #[test]
    fn randomized_svd_on_sparse_symmetric() {
        let mut rng = Rng::new(4);
        let n = 80;
        let mut trip = Vec::new();
        let mut dense = vec![0f32; n * n];
        // Two dense-ish blocks (strong structure) plus scattered weak entries.
        for i in 0..n as u32 {
            for j in i + 1..n as u32 {
                let block = (i < 10 && j < 10) || ((30..45).contains(&i) && (30..45).contains(&j));
                let v = if block {
                    0.5 + 0.5 * rng.f32()
                } else if rng.f32() < 0.03 {
                    0.1 * rng.f32()
                } else {
                    0.0
                };
                if v != 0.0 {
                    trip.push((i, j, v));
                    dense[i as usize * n + j as usize] = v;
                    dense[j as usize * n + i as usize] = v;
                }
            }
        }
        let op = SparseSymOp::from_upper(n, &trip);
        let exact = exact_singular_values(&dense, n, n);
        let svd = randomized_svd(&op, 4, 10, 3, &mut Rng::new(5));
        for k in 0..4 {
            assert!(
                (svd.s[k] - exact[k]).abs() < 1e-2 * exact[0],
                "k {k}: {} vs {}",
                svd.s[k],
                exact[k]
            );
        }
        let mut y = vec![0f32; n];
        let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        op.apply(&x, 1, &mut y);
        for i in 0..n {
            let want: f32 = (0..n).map(|j| dense[i * n + j] * x[j]).sum();
            assert!((y[i] - want).abs() < 1e-4);
        }
    }
}
