//! The sparse co-activation engine shared by both methods.
//!
//! Both research penalties only involve pairs of latents that fire on the same token.
//! With TopK codes a batch of B rows has at most `B * k * (k - 1)` ordered pair events,
//! against `F^2` entries for the dense formula. We compute, per latent `i`, the sparse
//! row `i` of `M^T M` (co-firing counts) and of `F^T F` (activation dot products) with
//! Gustavson's algorithm: walk the rows where `i` fires (a CSC transpose of the codes),
//! and scatter every other active latent of those rows into a dense per-thread
//! accumulator of length F (cache-resident at F = 16384). Latents are independent, so
//! they run in parallel with rayon, and each writes only its own slice of outputs, which
//! keeps the result bit-for-bit deterministic regardless of thread scheduling.
//!
//! [`PairEma`] keeps exponential moving averages of per-pair statistics in sparse,
//! bounded memory (see its docs for the eviction rule).

use crate::codes::SparseCodes;

/// Column-compressed (per latent) view of the non-zero entries of a batch of codes.
/// Entries with value exactly 0 are treated as "not firing" and left out.
#[derive(Clone, Debug, Default)]
pub struct Csc {
    pub d_sae: usize,
    /// Latent `i`'s entries are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    /// Row (token) of each entry.
    pub rows: Vec<u32>,
    /// Position of the entry in `codes.val` (so gradients can be scattered back).
    pub csr_pos: Vec<u32>,
    pub val: Vec<f32>,
}

impl Csc {
    pub fn build(codes: &SparseCodes) -> Csc {
        let f = codes.d_sae;
        let mut offsets = vec![0usize; f + 1];
        for (p, &i) in codes.idx.iter().enumerate() {
            if codes.val[p] != 0.0 {
                offsets[i as usize + 1] += 1;
            }
        }
        for i in 0..f {
            offsets[i + 1] += offsets[i];
        }
        let nnz = offsets[f];
        let mut fill = offsets.clone();
        let mut rows = vec![0u32; nnz];
        let mut csr_pos = vec![0u32; nnz];
        let mut val = vec![0f32; nnz];
        for r in 0..codes.rows {
            for p in codes.offsets[r]..codes.offsets[r + 1] {
                let v = codes.val[p];
                if v == 0.0 {
                    continue;
                }
                let i = codes.idx[p] as usize;
                let q = fill[i];
                fill[i] += 1;
                rows[q] = r as u32;
                csr_pos[q] = p as u32;
                val[q] = v;
            }
        }
        Csc {
            d_sae: f,
            offsets,
            rows,
            csr_pos,
            val,
        }
    }

    /// Number of rows in which latent `i` fires.
    #[inline]
    pub fn count(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    #[inline]
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
}

/// Per-thread dense accumulators of length F, reset after each latent by walking only
/// the touched entries (so a latent costs O(its pair events), not O(F)).
pub struct Scratch {
    /// `(count, dot)` per latent, interleaved so one access touches one cache line.
    pub acc: Vec<(u32, f32)>,
    pub w: Vec<f32>,
    pub pos: Vec<u32>,
    pub touched: Vec<u32>,
    pub ema_val: Vec<[f32; 2]>,
}

impl Scratch {
    pub fn new(f: usize) -> Scratch {
        Scratch {
            acc: vec![(0, 0.0); f],
            w: vec![0.0; f],
            pos: vec![u32::MAX; f],
            touched: Vec::with_capacity(1024),
            ema_val: vec![[0.0; 2]; f],
        }
    }

    /// Sparse row `i` of `M^T M` and `F^T F`: for every latent `j` co-firing with `i`
    /// (and `j == i` when `diag`), `acc[j] = (number of rows where both fire, sum over
    /// those rows of f_i * f_j)`. Touched latents are listed in
    /// `touched` in first-touch order (deterministic).
    pub fn accumulate(&mut self, i: usize, csc: &Csc, codes: &SparseCodes, diag: bool) {
        debug_assert!(self.touched.is_empty());
        for q in csc.range(i) {
            let vi = csc.val[q];
            let (idx, val) = codes.row(csc.rows[q] as usize);
            for (&j, &vj) in idx.iter().zip(val) {
                if vj == 0.0 || (!diag && j as usize == i) {
                    continue;
                }
                let a = &mut self.acc[j as usize];
                if a.0 == 0 {
                    self.touched.push(j);
                }
                a.0 += 1;
                a.1 += vi * vj;
            }
        }
    }

    /// For each row where `i` fires, `out[q] = sum_j w[j] * f_j` over the row's firing
    /// latents (the gradient of `sum_j w_ij f_i^T f_j` with respect to `f_ti`).
    pub fn gather_grad(
        &self,
        i: usize,
        csc: &Csc,
        codes: &SparseCodes,
        diag: bool,
        out: &mut [f32],
    ) {
        for (k, q) in csc.range(i).enumerate() {
            let (idx, val) = codes.row(csc.rows[q] as usize);
            let mut g = 0f32;
            for (&j, &vj) in idx.iter().zip(val) {
                if !diag && j as usize == i {
                    continue;
                }
                g += self.w[j as usize] * vj;
            }
            out[k] = g;
        }
    }

    /// Zero the accumulators of the touched latents and clear the list.
    pub fn reset(&mut self) {
        for &j in &self.touched {
            let j = j as usize;
            self.acc[j] = (0, 0.0);
            self.w[j] = 0.0;
        }
        self.touched.clear();
    }
}

/// One stored pair statistic, in the list of its first latent `i`: `v` holds two
/// values (e.g. `[n_ij, n_ji]`), `last` the update index at which they were written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairEntry {
    pub j: u32,
    pub last: u32,
    pub v: [f32; 2],
}

/// Exponential moving averages of pair statistics, sparse and bounded.
///
/// Semantics: identical to the dense EMA `e_t = m e_(t-1) + (1 - m) x_t` over all F x F
/// pairs where `x_t = 0` for pairs absent from the batch, initialised with the first
/// batch (`e_1 = x_1`). Storage: per latent `i`, a list of entries for the latents
/// `j` it has co-fired with; both `(i, j)` and `(j, i)` are stored (the two lists hold
/// the same numbers, swapped), so a latent's update needs no other latent's list and
/// latents update in parallel. Absent pairs decay lazily: a value written at update
/// `L` reads `v * m^(t - L)` at update `t`.
///
/// Eviction (bounded memory):
/// 1. an entry whose decayed value (the larger of its two numbers) is below `epsilon`
///    reads as 0 and is dropped when its latent is next updated;
/// 2. when the total number of entries exceeds `max_entries`, the smallest decayed
///    entries are dropped until at most `3/4 * max_entries` remain (the hysteresis makes
///    the O(entries) selection rare). Both copies of a pair hold the same value, so the
///    rule drops both together.
///
/// Memory: 16 bytes per entry, so `max_entries = 8_000_000` is at most 128 MB.
#[derive(Clone, Debug)]
pub struct PairEma {
    pub lists: Vec<Vec<PairEntry>>,
    pub momentum: f32,
    pub epsilon: f32,
    pub max_entries: usize,
    /// Number of completed updates; the current update's index while updating.
    pub t: u32,
    /// Total evictions by rule 2 (for the metrics log).
    pub evicted: u64,
}

impl PairEma {
    pub fn new(f: usize, momentum: f32, epsilon: f32, max_entries: usize) -> PairEma {
        PairEma {
            lists: vec![Vec::new(); f],
            momentum,
            epsilon,
            max_entries,
            t: 0,
            evicted: 0,
        }
    }

    pub fn entries(&self) -> usize {
        self.lists.iter().map(|l| l.len()).sum()
    }

    #[inline]
    fn decay(&self, e: &PairEntry, now: u32) -> [f32; 2] {
        let f = self.momentum.powi((now - e.last) as i32);
        [e.v[0] * f, e.v[1] * f]
    }

    /// Decayed value of an entry at the current update index (0 if below epsilon).
    #[inline]
    pub fn read(&self, e: &PairEntry) -> [f32; 2] {
        let d = self.decay(e, self.t);
        if d[0].max(d[1]) < self.epsilon {
            [0.0, 0.0]
        } else {
            d
        }
    }

    /// Update latent `i`'s list for update index `t` (the caller increments `t` once per
    /// batch via [`PairEma::begin`]). `touched` are the latents whose batch value is
    /// `batch(j)`; on return `scratch_val[j]` holds the new EMA for every touched `j`.
    /// Static helper so it can run on a `&mut` list while `self` is shared.
    // The scratch buffers are passed separately because the caller's closure borrows
    // other fields of the same scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn update_list(
        momentum: f32,
        epsilon: f32,
        t: u32,
        list: &mut Vec<PairEntry>,
        touched: &[u32],
        pos: &mut [u32],
        scratch_val: &mut [[f32; 2]],
        mut batch: impl FnMut(u32) -> [f32; 2],
    ) {
        let m = momentum;
        if t == 1 {
            // First batch: e_1 = x_1.
            for &j in touched {
                let b = batch(j);
                list.push(PairEntry { j, last: t, v: b });
                scratch_val[j as usize] = b;
            }
            return;
        }
        for (k, e) in list.iter().enumerate() {
            pos[e.j as usize] = k as u32;
        }
        let old_len = list.len();
        for &j in touched {
            let b = batch(j);
            let p = pos[j as usize];
            let new = if p != u32::MAX {
                let e = &mut list[p as usize];
                // Value after update t-1, then one EMA step with x_t = b.
                let f = m.powi((t - 1 - e.last) as i32);
                let mut prev = [e.v[0] * f, e.v[1] * f];
                if prev[0].max(prev[1]) < epsilon {
                    prev = [0.0, 0.0];
                }
                let new = [
                    m * prev[0] + (1.0 - m) * b[0],
                    m * prev[1] + (1.0 - m) * b[1],
                ];
                e.v = new;
                e.last = t;
                new
            } else {
                let new = [(1.0 - m) * b[0], (1.0 - m) * b[1]];
                list.push(PairEntry { j, last: t, v: new });
                new
            };
            scratch_val[j as usize] = new;
        }
        for e in &list[..old_len] {
            pos[e.j as usize] = u32::MAX;
        }
        // Rule 1: drop entries that now read as zero.
        list.retain(|e| {
            let f = m.powi((t - e.last) as i32);
            (e.v[0] * f).max(e.v[1] * f) >= epsilon
        });
    }

    /// Start update `t + 1` (call once per batch before the per-latent updates).
    pub fn begin(&mut self) -> u32 {
        self.t += 1;
        self.t
    }

    /// Rule 2: enforce the entry bound after a batch's updates.
    pub fn enforce_bound(&mut self) {
        let total = self.entries();
        if total <= self.max_entries {
            return;
        }
        let target = self.max_entries * 3 / 4;
        let now = self.t;
        let mut vals: Vec<f32> = Vec::with_capacity(total);
        for l in &self.lists {
            for e in l {
                let d = self.decay(e, now);
                vals.push(d[0].max(d[1]));
            }
        }
        // Keep the `target` largest: cutoff = the (total - target)-th smallest value;
        // everything <= cutoff goes (ties go too, so at most `target` remain).
        let k = total - target - 1;
        let (_, cut, _) = vals.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
        let cut = *cut;
        let m = self.momentum;
        let mut dropped = 0u64;
        for l in &mut self.lists {
            let before = l.len();
            l.retain(|e| {
                let f = m.powi((now - e.last) as i32);
                (e.v[0] * f).max(e.v[1] * f) > cut
            });
            dropped += (before - l.len()) as u64;
        }
        self.evicted += dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    pub(crate) fn random_codes(rng: &mut Rng, rows: usize, f: usize, k: usize) -> SparseCodes {
        let mut c = SparseCodes::with_capacity(rows, f, rows * k);
        for _ in 0..rows {
            let mut perm = rng.permutation(f);
            perm.truncate(k);
            c.push_row(
                perm.into_iter()
                    .map(|i| (i as u32, 0.1 + rng.f32() * 2.0))
                    .collect::<Vec<_>>(),
            );
        }
        c
    }

    #[test]
    fn accumulate_matches_dense_products() {
        let mut rng = Rng::new(5);
        let (b, f, k) = (37, 23, 5);
        let codes = random_codes(&mut rng, b, f, k);
        let dense = codes.to_dense();
        let csc = Csc::build(&codes);
        let mut s = Scratch::new(f);
        for i in 0..f {
            assert_eq!(
                csc.count(i),
                (0..b).filter(|&t| dense[t * f + i] != 0.0).count()
            );
            s.accumulate(i, &csc, &codes, true);
            for j in 0..f {
                let (mut c, mut d) = (0u32, 0f64);
                for t in 0..b {
                    let (a, bb) = (dense[t * f + i], dense[t * f + j]);
                    if a != 0.0 && bb != 0.0 {
                        c += 1;
                        d += a as f64 * bb as f64;
                    }
                }
                assert_eq!(s.acc[j].0, c);
                assert!((s.acc[j].1 as f64 - d).abs() < 1e-4 * (1.0 + d.abs()));
                assert_eq!(s.touched.contains(&(j as u32)), c > 0);
            }
            s.reset();
            assert!(s.acc.iter().all(|&c| c == (0, 0.0)));
        }
    }

    #[test]
    fn ema_bound_drops_smallest_pairs_symmetrically() {
        let mut ema = PairEma::new(4, 0.5, 0.0, 6);
        let t = ema.begin();
        let mut pos = vec![u32::MAX; 4];
        let mut sv = vec![[0f32; 2]; 4];
        // Pairs (0,1)=0.9, (0,2)=0.1, (1,3)=0.5, (2,3)=0.3: 8 entries > 6 -> keep 4.
        let vals = |a: u32, b: u32| -> f32 {
            match (a.min(b), a.max(b)) {
                (0, 1) => 0.9,
                (0, 2) => 0.1,
                (1, 3) => 0.5,
                (2, 3) => 0.3,
                _ => unreachable!(),
            }
        };
        let nbrs: [&[u32]; 4] = [&[1, 2], &[0, 3], &[0, 3], &[1, 2]];
        let (m, e) = (ema.momentum, ema.epsilon);
        for (i, list) in ema.lists.iter_mut().enumerate() {
            PairEma::update_list(m, e, t, list, nbrs[i], &mut pos, &mut sv, |j| {
                [vals(i as u32, j); 2]
            });
        }
        assert_eq!(ema.entries(), 8);
        ema.enforce_bound();
        assert_eq!(ema.entries(), 4);
        let kept: Vec<(usize, u32)> = ema
            .lists
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.iter().map(move |e| (i, e.j)))
            .collect();
        assert_eq!(kept, vec![(0, 1), (1, 0), (1, 3), (3, 1)]);
        assert_eq!(ema.evicted, 4);
    }
}
