//! The sparse co-activation engine shared by both methods.
//!
//! Both research penalties only involve pairs of latents that fire on the same token.
//! With TopK codes a batch of B rows has `B * k * (k - 1) / 2` unordered pair events,
//! against `F^2` entries for the dense formula. Each row's firing latents are sorted by
//! index once, so the partners `j > i` of latent `i` in a row are the entries after
//! `i`'s own position. Per latent `i` we compute the upper-triangular sparse row `i` of
//! `M^T M` (co-firing counts) and `F^T F` (activation dot products) with Gustavson's
//! algorithm: walk the rows where `i` fires (a CSC transpose) and scatter the later
//! entries into a dense per-thread accumulator of length F (cache-resident at
//! F = 16384). A pair's gradient then flows to both of its code values in the same
//! pass. Latents are processed in 16 fixed contiguous chunks in parallel; each chunk has
//! its own gradient buffer and the buffers are summed in chunk order, so results are
//! bit-for-bit identical for any number of threads.
//!
//! [`PairEma`] keeps exponential moving averages of per-pair statistics in sparse,
//! bounded memory (see its docs for the eviction rule).

use crate::codes::SparseCodes;
use rayon::prelude::*;

/// The non-zero entries of a batch of codes, rows sorted by latent index, plus their
/// per-latent (CSC) transpose. Entries with value exactly 0 are "not firing" and left out.
#[derive(Clone, Debug, Default)]
pub struct Csc {
    pub d_sae: usize,
    pub rows: usize,
    /// Row `r`'s sorted entries are `row_off[r]..row_off[r + 1]` of `idx`/`val`.
    pub row_off: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    /// Position of each sorted entry in the original `codes.val`.
    pub orig: Vec<u32>,
    /// Latent `i`'s entries are `col_off[i]..col_off[i + 1]` of `col_pos`, which holds
    /// positions into the sorted arrays (ascending rows).
    pub col_off: Vec<usize>,
    pub col_pos: Vec<u32>,
    /// `row_end[p]`: end of the row that sorted position `p` belongs to.
    pub row_end: Vec<u32>,
}

impl Csc {
    pub fn build(codes: &SparseCodes) -> Csc {
        let f = codes.d_sae;
        let mut row_off = Vec::with_capacity(codes.rows + 1);
        row_off.push(0);
        let nnz_max = codes.nnz();
        let (mut idx, mut val, mut orig) = (
            Vec::with_capacity(nnz_max),
            Vec::with_capacity(nnz_max),
            Vec::with_capacity(nnz_max),
        );
        let mut row: Vec<(u32, f32, u32)> = Vec::new();
        for r in 0..codes.rows {
            row.clear();
            for p in codes.offsets[r]..codes.offsets[r + 1] {
                if codes.val[p] != 0.0 {
                    row.push((codes.idx[p], codes.val[p], p as u32));
                }
            }
            row.sort_unstable_by_key(|e| e.0);
            for &(i, v, p) in &row {
                idx.push(i);
                val.push(v);
                orig.push(p);
            }
            row_off.push(idx.len());
        }
        let nnz = idx.len();
        let mut col_off = vec![0usize; f + 1];
        for &i in &idx {
            col_off[i as usize + 1] += 1;
        }
        for i in 0..f {
            col_off[i + 1] += col_off[i];
        }
        let mut fill = col_off.clone();
        let mut col_pos = vec![0u32; nnz];
        let mut row_end = vec![0u32; nnz];
        for r in 0..codes.rows {
            for p in row_off[r]..row_off[r + 1] {
                let i = idx[p] as usize;
                col_pos[fill[i]] = p as u32;
                fill[i] += 1;
                row_end[p] = row_off[r + 1] as u32;
            }
        }
        Csc {
            d_sae: f,
            rows: codes.rows,
            row_off,
            idx,
            val,
            orig,
            col_off,
            col_pos,
            row_end,
        }
    }

    /// Number of rows in which latent `i` fires.
    #[inline]
    pub fn count(&self, i: usize) -> usize {
        self.col_off[i + 1] - self.col_off[i]
    }

    /// Sorted positions of latent `i`'s entries.
    #[inline]
    pub fn col(&self, i: usize) -> &[u32] {
        &self.col_pos[self.col_off[i]..self.col_off[i + 1]]
    }

    /// Euclidean norm of each latent's activation column (f64 accumulation).
    pub fn col_norms(&self) -> Vec<f32> {
        (0..self.d_sae)
            .map(|i| {
                self.col(i)
                    .iter()
                    .map(|&p| (self.val[p as usize] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .collect()
    }
}

/// Per-thread dense accumulators of length F, reset after each latent by walking only
/// the touched entries (so a latent costs O(its pair events), not O(F)).
pub struct Scratch {
    /// `(count, dot)` per latent, interleaved so one access touches one cache line.
    pub acc: Vec<(u32, f32)>,
    /// Per-partner gradient weight set by the method between the two passes.
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

    /// Upper-triangular sparse row `i` of `M^T M` and `F^T F`: for every latent `j > i`
    /// co-firing with `i` (and `j == i` when `diag`), `acc[j] = (number of rows where
    /// both fire, sum over those rows of f_i * f_j)`. Touched latents are listed in
    /// `touched` in first-touch order (deterministic).
    pub fn accumulate(&mut self, i: usize, csc: &Csc, diag: bool) {
        debug_assert!(self.touched.is_empty());
        for &p in csc.col(i) {
            let p = p as usize;
            let vi = csc.val[p];
            let from = if diag { p } else { p + 1 };
            let end = csc.row_end[p] as usize;
            for (&j, &vj) in csc.idx[from..end].iter().zip(&csc.val[from..end]) {
                let a = &mut self.acc[j as usize];
                if a.0 == 0 {
                    self.touched.push(j);
                }
                a.0 += 1;
                a.1 += vi * vj;
            }
        }
    }

    /// Gradient of `sum_(j >= i) w[j] f_i^T f_j` (with `w` set for the touched `j`)
    /// with respect to the code values of `i` and of its partners, added into `grad`
    /// (indexed by sorted position).
    pub fn scatter_grad(&self, i: usize, csc: &Csc, diag: bool, grad: &mut [f32]) {
        for &p in csc.col(i) {
            let p = p as usize;
            let vi = csc.val[p];
            let from = if diag { p } else { p + 1 };
            let end = csc.row_end[p] as usize;
            let mut gi = 0f32;
            let partners = csc.idx[from..end].iter().zip(&csc.val[from..end]);
            for (g, (&j, &vj)) in grad[from..end].iter_mut().zip(partners) {
                let w = self.w[j as usize];
                gi += w * vj;
                *g += w * vi;
            }
            grad[p] += gi;
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

thread_local! {
    /// Each rayon worker keeps its O(F) scratch between steps (allocating and zeroing
    /// ~0.4 MB per chunk per step was a measurable share of the penalty's time). The
    /// scratch is always left reset (accumulators zero, `pos` all `u32::MAX`).
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

fn with_scratch<R>(f: usize, body: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|s| s.acc.len()) != Some(f) {
            *slot = Some(Scratch::new(f));
        }
        body(slot.as_mut().expect("scratch just set"))
    })
}

/// Number of fixed latent chunks (independent of the thread count, for determinism).
pub const CHUNKS: usize = 16;

/// Run `visit(scratch, i, list)` for every firing latent `i` after
/// [`Scratch::accumulate`]; `visit` sets `scratch.w[j]` for the touched `j` when a
/// gradient is wanted. Returns the per-latent results in latent order and, when
/// `want_grad`, the gradient indexed by sorted position (see [`Csc::orig`]).
pub fn run_latents<R: Send, const N: usize>(
    csc: &Csc,
    lists: Option<&mut [Vec<PairEntry<N>>]>,
    diag: bool,
    want_grad: bool,
    visit: impl Fn(&mut Scratch, usize, Option<&mut Vec<PairEntry<N>>>) -> R + Sync,
) -> (Vec<R>, Vec<f32>) {
    let f = csc.d_sae;
    let nnz = csc.idx.len();
    let per = f.div_ceil(CHUNKS).max(1);
    let mut chunk_lists: Vec<Option<&mut [Vec<PairEntry<N>>]>> = Vec::with_capacity(CHUNKS);
    match lists {
        Some(l) => {
            assert_eq!(l.len(), f, "pair statistics built for another d_sae");
            for c in l.chunks_mut(per) {
                chunk_lists.push(Some(c));
            }
        }
        None => chunk_lists.extend((0..f.div_ceil(per)).map(|_| None)),
    }
    let outs: Vec<(Vec<R>, Vec<f32>)> = chunk_lists
        .into_par_iter()
        .enumerate()
        .map(|(c, mut lists)| {
            let lo = c * per;
            let hi = (lo + per).min(f);
            with_scratch(f, |s| {
                let mut grad = vec![0f32; if want_grad { nnz } else { 0 }];
                let mut res = Vec::new();
                for i in lo..hi {
                    if csc.count(i) == 0 {
                        continue;
                    }
                    if let Some(l) = lists.as_ref().and_then(|l| l.get(i + 1 - lo)) {
                        prefetch_list(l);
                    }
                    s.accumulate(i, csc, diag);
                    let list = lists.as_mut().map(|l| &mut l[i - lo]);
                    res.push(visit(s, i, list));
                    if want_grad {
                        s.scatter_grad(i, csc, diag, &mut grad);
                    }
                    s.reset();
                }
                (res, grad)
            })
        })
        .collect();
    let mut grad = vec![0f32; if want_grad { nnz } else { 0 }];
    let mut res = Vec::new();
    for (r, g) in outs {
        res.extend(r);
        if want_grad {
            grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    (res, grad)
}

/// Ask for the start of the next latent's list while this one is processed: the walks
/// read millions of entries in thousands of short lists at scattered addresses, and a
/// profile put a fifth of `update_list`'s samples on the load of a list entry (the
/// hardware prefetcher follows a list once it has started, not the jump to the next).
/// Measured effect within noise (docs/benchmarks-methods.md, session 7).
#[inline]
fn prefetch_list<const N: usize>(l: &[PairEntry<N>]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(l).min(1024);
        let base = l.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch is a hint and never faults; `base + off` is inside `l`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = l;
}

/// Ordered co-firing pair events of a batch: `sum_r nnz_r (nnz_r - 1)`. With TopK codes
/// this is `B k (k - 1)`; with the dense codes of a ReLU SAE early in training it is
/// `B L0^2` (5 billion at B = 2048, L0 = 1600), where the pair engine would cost seconds
/// per step.
pub fn pair_events(codes: &SparseCodes) -> u64 {
    (0..codes.rows)
        .map(|r| {
            let n = (codes.offsets[r + 1] - codes.offsets[r]) as u64;
            n * n.saturating_sub(1)
        })
        .sum()
}

/// The rows `0, stride, 2 stride, ...` of `codes`: the deterministic row sample the
/// pair statistics use when a batch has more pair events than their budget.
pub fn row_sample(codes: &SparseCodes, stride: usize) -> SparseCodes {
    let stride = stride.max(1);
    let rows: Vec<usize> = (0..codes.rows).step_by(stride).collect();
    let nnz = rows
        .iter()
        .map(|&r| codes.offsets[r + 1] - codes.offsets[r])
        .sum();
    let mut out = SparseCodes::with_capacity(rows.len(), codes.d_sae, nnz);
    for r in rows {
        let (idx, val) = codes.row(r);
        out.push_row(idx.iter().copied().zip(val.iter().copied()));
    }
    out
}

const PEMA_MAGIC: &[u8] = b"SAELAB-PAIR-EMA3";
/// The formats with a per-entry update index (`(j, last, v0, v1)` entries); V1 also
/// lacks the pending cutoff of rule 2. Read and converted on load.
const PEMA_MAGIC_V2: &[u8] = b"SAELAB-PAIR-EMA2";
const PEMA_MAGIC_V1: &[u8] = b"SAELAB-PAIR-EMA1";

/// When the decay since the store's base update falls below this, the stored numbers
/// are rescaled to a new base (see [`PairEma`]): a pass over every entry every
/// `60 ln 2 / -ln m` updates (~4,100 at m = 0.99), keeping stored numbers far from the
/// limits of f32 (`epsilon / 2^-60` is ~1e15 at epsilon 1e-3).
const RENORM: f64 = 1.0 / (1u64 << 60) as f64;

/// The parameters of one update's per-latent walks (see [`PairEma::begin`]), shared by
/// reference by all of them. Thresholds are in stored units (see [`PairEma`]).
#[derive(Clone, Debug)]
pub struct Walk {
    /// The update index.
    pub t: u32,
    /// The first update of an empty store (`e_1 = x_1`).
    first: bool,
    /// `(1 - m) / D_t`: what a batch value adds to a stored number.
    gain: f32,
    /// `D_t`: stored number -> value at update `t`.
    d_now: f32,
    /// Rule 1's epsilon at update `t - 1` and at update `t`.
    eps_prev: f32,
    eps_now: f32,
    /// Rule 2's pending cutoff (-inf when none).
    cut: f32,
}

/// One stored pair statistic, in the list of its first latent `i`: `N` numbers (e.g.
/// `[n_ij, n_ji]`, or one symmetric statistic), in the store's units (see [`PairEma`]).
/// 8 bytes with one value, 12 with two: the walks stream millions of these every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairEntry<const N: usize> {
    pub j: u32,
    pub s: [f32; N],
}

impl<const N: usize> PairEntry<N> {
    #[inline]
    fn top(&self) -> f32 {
        self.s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

/// Exponential moving averages of `N` (1 or 2) per-pair statistics, sparse and bounded.
///
/// Semantics: identical to the dense EMA `e_t = m e_(t-1) + (1 - m) x_t` over all F x F
/// pairs where `x_t = 0` for pairs absent from the batch, initialised with the first
/// batch (`e_1 = x_1`). Storage: per latent `i`, a list of entries for the latents
/// `j >= i` it has co-fired with (each unordered pair once, in the list of its smaller
/// latent, with its `N` values), so a latent's update needs no other latent's list and
/// latents update in parallel.
///
/// Absent pairs decay without being touched: every entry stores `s = e_t / D_t` with
/// one store-wide decay `D_t = m^(t - base)`. An absent pair's `s` does not change
/// (`e_t = m e_(t-1)` is `s` read at `D_t = m D_(t-1)`), a present pair adds
/// `(1 - m) x_t / D_t`, and comparisons between entries (the eviction cutoff) need no
/// decay at all. When `D_t` would fall below 2^-60 every stored number is multiplied by
/// the current decay and `base` moves to the current update (for `m < 2^-60`, when the
/// old values read as less than 2^-60 of themselves after one update, the store is
/// emptied instead). An earlier layout kept each entry's own last-update index and
/// decayed on read: 16 bytes per entry instead of 8 (one value), and a slower walk.
///
/// Eviction (bounded memory):
/// 1. an entry whose value (the larger of its numbers) is below `epsilon` reads as 0
///    and is dropped when its latent is next updated;
/// 2. when the total number of entries exceeds `max_entries`, the smallest entries are
///    evicted until about `3/4 * max_entries` remain (the cutoff value is exact below
///    64k entries; above, it is estimated from a strided sample of 64k entries, so the
///    count kept is within sampling error of the target, ~0.2%). The eviction happens in
///    the next update's walks ([`PairEma::enforce_bound`]); the hysteresis makes it
///    rarer.
///
/// Memory: `4 + 4 N` bytes per entry. Between a step that exceeds the bound and the
/// walks that evict, the store can hold up to 1.5x `max_entries` (more triggers the
/// immediate pass), so `max_entries = 8_000_000` with two values is at most 144 MB.
#[derive(Clone, Debug)]
pub struct PairEma<const N: usize> {
    pub lists: Vec<Vec<PairEntry<N>>>,
    pub momentum: f32,
    pub epsilon: f32,
    pub max_entries: usize,
    /// Number of completed updates; the current update's index while updating.
    pub t: u32,
    /// Total evictions by rule 2 (for the metrics log).
    pub evicted: u64,
    /// The update at which the stored numbers are the values (`D = 1`).
    base: u32,
    /// `D_t` at the current `t`.
    d_now: f32,
    /// Rule 2's cutoff for the next update's walks: (stored number, update index it was
    /// set at); cleared after that update.
    cut: Option<(f32, u32)>,
}

impl<const N: usize> PairEma<N> {
    const VALUES: () = assert!(N == 1 || N == 2, "a pair entry holds 1 or 2 values");

    pub fn new(f: usize, momentum: f32, epsilon: f32, max_entries: usize) -> PairEma<N> {
        let () = Self::VALUES;
        PairEma {
            lists: vec![Vec::new(); f],
            momentum,
            epsilon,
            max_entries,
            t: 0,
            evicted: 0,
            base: 0,
            d_now: 1.0,
            cut: None,
        }
    }

    pub fn entries(&self) -> usize {
        self.lists.iter().map(|l| l.len()).sum()
    }

    /// `m^(t - base)` in f64, 1 for `t <= base`.
    fn decay_at(&self, t: u32) -> f64 {
        if t <= self.base {
            1.0
        } else {
            (self.momentum as f64).powi((t - self.base) as i32)
        }
    }

    /// Value of an entry at the current update index (0 if below epsilon).
    #[inline]
    pub fn read(&self, e: &PairEntry<N>) -> [f32; N] {
        // Scaling by `d_now > 0` keeps the largest number the largest, bit for bit.
        if e.top() * self.d_now < self.epsilon {
            [0.0; N]
        } else {
            e.s.map(|x| x * self.d_now)
        }
    }

    /// Update latent `i`'s list for update `w.t`. `touched` are the latents whose batch
    /// values are `batch(j)`; on return `scratch_val[j][..N]` holds the new EMA for
    /// every touched `j`. Returns the number of entries evicted by rule 2 (`w.cut`) on
    /// the way. Static helper so it can run on a `&mut` list while `self` is shared.
    // The scratch buffers are passed separately because the caller's closure borrows
    // other fields of the same scratch.
    pub fn update_list(
        w: &Walk,
        list: &mut Vec<PairEntry<N>>,
        touched: &[u32],
        pos: &mut [u32],
        scratch_val: &mut [[f32; 2]],
        mut batch: impl FnMut(u32) -> [f32; N],
    ) -> u64 {
        let out = |scratch_val: &mut [[f32; 2]], j: u32, v: [f32; N]| {
            scratch_val[j as usize][..N].copy_from_slice(&v);
        };
        if w.first {
            // First batch: e_1 = x_1 (D_1 = 1).
            for &j in touched {
                let b = batch(j);
                list.push(PairEntry { j, s: b });
                out(scratch_val, j, b);
            }
            return 0;
        }
        // Rule 2, fused into this walk: an entry at or below the cutoff is evicted (a
        // touched one restarts from 0, as a new pair would).
        let mut evicted = 0u64;
        // One pass over the stored list (it is usually several times longer than the
        // batch's partners): index the touched latents, not the list, then update,
        // check and compact the list in place. Entries keep their order and new pairs
        // are appended in touched order. Untouched entries are only read (and moved
        // once an earlier one was dropped).
        for (k, &j) in touched.iter().enumerate() {
            pos[j as usize] = k as u32;
        }
        // Marks a touched latent whose entry was found in the list.
        const SEEN: u32 = u32::MAX - 1;
        let mut kept = 0;
        for r in 0..list.len() {
            let mut e = list[r];
            let p = pos[e.j as usize];
            if p != u32::MAX && p != SEEN {
                let b = batch(e.j);
                let top = e.top();
                // Rule 1 at update t - 1 (the value reads as zero), rule 2 at t.
                if top < w.eps_prev {
                    e.s = [0.0; N];
                } else if top <= w.cut {
                    e.s = [0.0; N];
                    evicted += 1;
                }
                for (s, b) in e.s.iter_mut().zip(b) {
                    *s += w.gain * b;
                }
                out(scratch_val, e.j, e.s.map(|x| x * w.d_now));
                pos[e.j as usize] = SEEN;
                // An updated entry is kept unless its new value reads as zero (rule 1).
                if e.top() >= w.eps_now {
                    list[kept] = e;
                    kept += 1;
                }
            } else {
                let top = e.top();
                // Rule 1: drop entries that now read as zero.
                if top < w.eps_now {
                    continue;
                }
                if top <= w.cut {
                    evicted += 1;
                    continue;
                }
                if kept != r {
                    list[kept] = e;
                }
                kept += 1;
            }
        }
        list.truncate(kept);
        for &j in touched {
            let seen = pos[j as usize] == SEEN;
            pos[j as usize] = u32::MAX;
            if !seen {
                let s = batch(j).map(|b| w.gain * b);
                out(scratch_val, j, s.map(|x| x * w.d_now));
                let e = PairEntry { j, s };
                if e.top() >= w.eps_now {
                    list.push(e);
                }
            }
        }
        evicted
    }

    /// Compact little-endian serialisation for checkpoints (JSON would be ~3x larger
    /// at millions of entries): magic, latent count `u64`, `N` `u32`, `t` `u32`, `base`
    /// `u32`, `evicted` `u64`, the pending cutoff of rule 2 (`u32` 0/1, its stored
    /// number `f32`, its update `u32`), then per latent the entry count `u32` and its
    /// `(j u32, s f32 x N)` entries.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + 4 * self.lists.len() + (4 + 4 * N) * self.entries());
        out.extend_from_slice(PEMA_MAGIC);
        out.extend_from_slice(&(self.lists.len() as u64).to_le_bytes());
        out.extend_from_slice(&(N as u32).to_le_bytes());
        out.extend_from_slice(&self.t.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&self.evicted.to_le_bytes());
        let (has, c, at) = self.cut.map_or((0u32, 0f32, 0u32), |(c, at)| (1, c, at));
        out.extend_from_slice(&has.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        for l in &self.lists {
            out.extend_from_slice(&(l.len() as u32).to_le_bytes());
            for e in l {
                out.extend_from_slice(&e.j.to_le_bytes());
                for s in e.s {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
        out
    }

    /// Restore the statistics written by [`PairEma::to_bytes`], or by the earlier
    /// per-entry-update-index formats (converted to this layout at their saved update;
    /// a one-value store keeps the first of their two values, which were equal).
    /// The hyper-parameters stay those of `self`; errors name what is wrong.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use anyhow::{bail, Context};
        let mut r = bytes;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            if r.len() < n {
                bail!("pair statistics: saved state is truncated");
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let f32_of = |b: &[u8]| f32::from_bits(u32_of(b));
        let magic = take(PEMA_MAGIC.len())?;
        let version = match magic {
            m if m == PEMA_MAGIC => 3,
            m if m == PEMA_MAGIC_V2 => 2,
            m if m == PEMA_MAGIC_V1 => 1,
            _ => bail!("pair statistics: saved state has the wrong format"),
        };
        let n = u64::from_le_bytes(take(8)?.try_into().context("length")?) as usize;
        if n != self.lists.len() {
            bail!(
                "pair statistics: saved state has {n} latents, this run has {}",
                self.lists.len()
            );
        }
        if version == 3 {
            let saved = u32_of(take(4)?) as usize;
            if saved != N {
                bail!("pair statistics: saved state has {saved} values per pair, this method keeps {N}");
            }
        }
        let t = u32_of(take(4)?);
        let base = if version == 3 { u32_of(take(4)?) } else { t };
        let evicted = u64::from_le_bytes(take(8)?.try_into().context("evicted")?);
        let cut = if version == 1 {
            None
        } else {
            let has = u32_of(take(4)?);
            let c = f32_of(take(4)?);
            let at = u32_of(take(4)?);
            (has == 1).then_some((c, at))
        };
        let m = self.momentum as f64;
        // Old formats: `v * m^(t - last)` is the value at the saved update `t`, which
        // becomes the new base; an old cutoff was a value at its own update.
        let age = |last: u32| m.powi(t.saturating_sub(last) as i32) as f32;
        let cut = match (version, cut) {
            (3, c) => c,
            (_, Some((c, at))) => Some((c * age(at), at)),
            (_, None) => None,
        };
        let entry_bytes = if version == 3 { 4 + 4 * N } else { 16 };
        let mut lists = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u32_of(take(4)?) as usize;
            let raw = take(entry_bytes * len)?;
            let mut l = Vec::with_capacity(len);
            for e in raw.chunks_exact(entry_bytes) {
                let j = u32_of(&e[0..4]);
                if j as usize >= n {
                    bail!("pair statistics: saved state names latent {j} >= {n}");
                }
                let s: [f32; N] = if version == 3 {
                    std::array::from_fn(|q| f32_of(&e[4 + 4 * q..8 + 4 * q]))
                } else {
                    let f = age(u32_of(&e[4..8]));
                    std::array::from_fn(|q| f32_of(&e[8 + 4 * q..12 + 4 * q]) * f)
                };
                l.push(PairEntry { j, s });
            }
            lists.push(l);
        }
        if !r.is_empty() {
            bail!(
                "pair statistics: {} unexpected trailing bytes in saved state",
                r.len()
            );
        }
        self.lists = lists;
        self.t = t;
        self.base = base;
        self.d_now = self.decay_at(t) as f32;
        self.evicted = evicted;
        self.cut = cut;
        Ok(())
    }

    /// Start update `t + 1` (call once per batch before the per-latent updates) and
    /// return the parameters of its walks, copied out so the lists can be borrowed
    /// mutably while the walks run.
    pub fn begin(&mut self) -> Walk {
        self.t += 1;
        let t = self.t;
        let first = t == 1;
        if first {
            self.base = 1;
        }
        if self.decay_at(t) < RENORM {
            if (self.momentum as f64) < RENORM {
                // One update shrinks every old value below 2^-60 of itself: forget them.
                self.lists.iter_mut().for_each(|l| l.clear());
                self.cut = None;
                self.base = t;
            } else {
                // Rebase on update t - 1: its values become the stored numbers.
                let d = self.decay_at(t - 1) as f32;
                self.lists
                    .par_iter_mut()
                    .with_min_len(256)
                    .for_each(|l| l.iter_mut().for_each(|e| e.s = e.s.map(|x| x * d)));
                if let Some((c, _)) = &mut self.cut {
                    *c *= d;
                }
                self.base = t - 1;
            }
        }
        let d_now = self.decay_at(t);
        let d_prev = self.decay_at(t - 1);
        self.d_now = d_now as f32;
        let eps = self.epsilon as f64;
        Walk {
            t,
            first,
            gain: ((1.0 - self.momentum as f64) / d_now) as f32,
            d_now: d_now as f32,
            eps_prev: (eps / d_prev) as f32,
            eps_now: (eps / d_now) as f32,
            cut: self.cut.map_or(f32::NEG_INFINITY, |(c, _)| c),
        }
    }

    /// Finish an update: count the evictions its walks made, then enforce the bound.
    pub fn end(&mut self, evicted: u64) {
        self.evicted += evicted;
        self.enforce_bound();
    }

    /// Rule 2: enforce the entry bound after a batch's updates. Above the bound, the
    /// cutoff that keeps about 3/4 of it is set for the next update, whose walks evict
    /// the entries at or below it in the lists they visit anyway (every latent that
    /// fires). Only far above the bound (more than 1.5x, e.g. when many latents
    /// stopped firing) does a separate pass over every list evict them at once.
    pub fn enforce_bound(&mut self) {
        if matches!(self.cut, Some((_, at)) if at < self.t) {
            self.cut = None;
        }
        let total = self.entries();
        if total <= self.max_entries {
            return;
        }
        let target = self.max_entries * 3 / 4;
        // Stored numbers share one decay, so they rank entries as their values do.
        let value = |e: &PairEntry<N>| e.top();
        // The cutoff comes from a strided sample of at most ~64k entries (positions 0,
        // stride, 2 stride, ... of the lists laid end to end, gathered in parallel): an
        // exact selection over millions of entries, run whenever the bound is reached
        // (every step for self-correcting at F = 16384), cost more than the penalty
        // itself, and a sequential 256k sample still ~5 ms (a cache miss per sampled
        // entry). The kept fraction's sampling error is ~0.2% of the entries. Below the
        // sample size the selection is exact.
        let stride = total.div_ceil(SAMPLE).max(1);
        let mut ends = Vec::with_capacity(self.lists.len());
        let mut acc = 0usize;
        for l in &self.lists {
            acc += l.len();
            ends.push(acc);
        }
        let lists = &self.lists;
        let mut sample: Vec<f32> = (0..total.div_ceil(stride))
            .into_par_iter()
            .with_min_len(1024)
            .map(|s| {
                let g = s * stride;
                let l = ends.partition_point(|&e| e <= g);
                let start = ends[l] - lists[l].len();
                value(&lists[l][g - start])
            })
            .collect();
        // Keep the `target` largest: cutoff = the (total - target)-th smallest value;
        // everything <= cutoff goes (ties go too).
        let k = ((total - target) * sample.len() / total).clamp(1, sample.len()) - 1;
        let (_, cut, _) = sample.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
        let cut = *cut;
        if total <= self.max_entries + self.max_entries / 2 {
            self.cut = Some((cut, self.t));
            return;
        }
        let dropped: usize = self
            .lists
            .par_iter_mut()
            .with_min_len(256)
            .map(|l| {
                let before = l.len();
                l.retain(|e| value(e) > cut);
                before - l.len()
            })
            .sum();
        self.evicted += dropped as u64;
    }
}

/// Sample size for the eviction cutoff of [`PairEma::enforce_bound`].
const SAMPLE: usize = 1 << 16;

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
    fn accumulate_and_scatter_match_dense_products() {
        let mut rng = Rng::new(5);
        let (b, f, k) = (37, 23, 5);
        let codes = random_codes(&mut rng, b, f, k);
        let dense = codes.to_dense();
        let csc = Csc::build(&codes);
        let mut s = Scratch::new(f);
        for diag in [false, true] {
            for i in 0..f {
                assert_eq!(
                    csc.count(i),
                    (0..b).filter(|&t| dense[t * f + i] != 0.0).count()
                );
                s.accumulate(i, &csc, diag);
                for j in 0..f {
                    let (mut c, mut d) = (0u32, 0f64);
                    if j > i || (diag && j == i) {
                        for t in 0..b {
                            let (a, bb) = (dense[t * f + i], dense[t * f + j]);
                            if a != 0.0 && bb != 0.0 {
                                c += 1;
                                d += a as f64 * bb as f64;
                            }
                        }
                    }
                    assert_eq!(s.acc[j].0, c);
                    assert!((s.acc[j].1 as f64 - d).abs() < 1e-4 * (1.0 + d.abs()));
                    assert_eq!(s.touched.contains(&(j as u32)), c > 0);
                }
                // Gradient of sum_j w_j f_i.f_j with w_j = j + 1 (j > i), by hand.
                for &j in &s.touched {
                    s.w[j as usize] = j as f32 + 1.0;
                }
                let mut g = vec![0f32; csc.idx.len()];
                s.scatter_grad(i, &csc, diag, &mut g);
                let mut gd = vec![0f64; b * f];
                for t in 0..b {
                    let fi = dense[t * f + i] as f64;
                    if fi == 0.0 {
                        continue;
                    }
                    for j in 0..f {
                        let fj = dense[t * f + j] as f64;
                        if fj != 0.0 && (j > i || (diag && j == i)) {
                            let w = j as f64 + 1.0;
                            gd[t * f + i] += w * fj;
                            gd[t * f + j] += w * fi;
                        }
                    }
                }
                for (q, &p) in csc.orig.iter().enumerate() {
                    let r = codes.offsets.partition_point(|&o| o <= p as usize) - 1;
                    let want = gd[r * f + codes.idx[p as usize] as usize];
                    assert!((g[q] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
                s.reset();
                assert!(s.acc.iter().all(|&c| c == (0, 0.0)));
            }
        }
    }

    /// One update of `ema` from random batch values over random pairs `(i, j >= i)`, also
    /// applied to `dense` (`f x f x N`, f64) by the EMA formula; checks the new values
    /// the walks report.
    fn random_update<const N: usize>(rng: &mut Rng, ema: &mut PairEma<N>, dense: &mut [f64]) {
        let f = ema.lists.len();
        let m = ema.momentum as f64;
        let mut pos = vec![u32::MAX; f];
        let mut sv = vec![[0f32; 2]; f];
        let w = ema.begin();
        let mut x = vec![0f64; f * f * N];
        for (i, list) in ema.lists.iter_mut().enumerate() {
            let touched: Vec<u32> = (i..f)
                .filter(|_| rng.f32() < 0.3)
                .map(|j| j as u32)
                .collect();
            let vals: Vec<[f32; N]> = touched
                .iter()
                .map(|_| std::array::from_fn(|_| 0.1 + rng.f32()))
                .collect();
            PairEma::update_list(&w, list, &touched, &mut pos, &mut sv, |j| {
                vals[touched.iter().position(|&t| t == j).unwrap()]
            });
            for (&j, v) in touched.iter().zip(&vals) {
                for q in 0..N {
                    let at = (i * f + j as usize) * N + q;
                    x[at] = v[q] as f64;
                    // The walk reports the new value of every touched pair.
                    let want = if w.t == 1 {
                        x[at]
                    } else {
                        m * dense[at] + (1.0 - m) * x[at]
                    };
                    assert!((sv[j as usize][q] as f64 - want).abs() <= 1e-5 * want);
                }
            }
        }
        for (d, x) in dense.iter_mut().zip(&x) {
            *d = if ema.t == 1 {
                *x
            } else {
                m * *d + (1.0 - m) * x
            };
        }
        ema.end(0);
    }

    fn assert_matches_dense<const N: usize>(ema: &PairEma<N>, dense: &[f64]) {
        let f = ema.lists.len();
        let mut seen = vec![false; f * f];
        for (i, l) in ema.lists.iter().enumerate() {
            for e in l {
                let v = ema.read(e);
                seen[i * f + e.j as usize] = true;
                for q in 0..N {
                    let want = dense[(i * f + e.j as usize) * N + q];
                    assert!(
                        (v[q] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-30),
                        "t {} pair ({i}, {}): {} vs {want}",
                        ema.t,
                        e.j,
                        v[q]
                    );
                }
            }
        }
        // With epsilon 0 nothing above zero is dropped.
        for (p, &s) in seen.iter().enumerate() {
            if !s {
                assert!((0..N).all(|q| dense[p * N + q] == 0.0 || ema.epsilon > 0.0));
            }
        }
    }

    #[test]
    fn ema_equals_dense_ema_across_rebases() {
        // m = 0.7: the store rebases every ~116 updates; 300 updates cross it twice.
        // Epsilon 0 keeps every pair ever seen; the comparison is relative.
        let mut rng = Rng::new(17);
        let f = 9;
        let mut ema = PairEma::<2>::new(f, 0.7, 0.0, 1 << 20);
        let mut dense = vec![0f64; f * f * 2];
        let mut bases = Vec::new();
        for _ in 0..300 {
            random_update(&mut rng, &mut ema, &mut dense);
            assert_matches_dense(&ema, &dense);
            bases.push(ema.base);
        }
        bases.dedup();
        assert!(bases.len() >= 3, "{bases:?}");
        // Round trip through a checkpoint, then on identically.
        let mut back = PairEma::<2>::new(f, 0.7, 0.0, 1 << 20);
        back.load_bytes(&ema.to_bytes()).unwrap();
        let (mut r1, mut r2) = (Rng::new(5), Rng::new(5));
        let mut d2 = dense.clone();
        for _ in 0..20 {
            random_update(&mut r1, &mut ema, &mut dense);
            random_update(&mut r2, &mut back, &mut d2);
        }
        assert_eq!(back.lists, ema.lists);
        // A one-value store refuses a two-value state.
        let err = PairEma::<1>::new(f, 0.7, 0.0, 1 << 20)
            .load_bytes(&ema.to_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("2 values per pair"), "{err}");
    }

    #[test]
    fn ema_with_zero_momentum_keeps_only_the_batch() {
        let mut rng = Rng::new(3);
        let f = 7;
        let mut ema = PairEma::<1>::new(f, 0.0, 0.0, 1 << 20);
        let mut dense = vec![0f64; f * f];
        for _ in 0..6 {
            random_update(&mut rng, &mut ema, &mut dense);
            assert_matches_dense(&ema, &dense);
            // Only this batch's pairs remain.
            let stored: usize = ema.entries();
            assert_eq!(stored, dense.iter().filter(|&&d| d != 0.0).count());
        }
    }

    #[test]
    fn ema_reads_the_earlier_checkpoint_format() {
        // Format 2: (j, last, v0, v1) entries read as v * m^(t - last) at update t.
        let (m, t) = (0.5f32, 7u32);
        let mut b = Vec::new();
        b.extend_from_slice(PEMA_MAGIC_V2);
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&11u64.to_le_bytes()); // evicted
        b.extend_from_slice(&1u32.to_le_bytes()); // a pending cutoff of 0.4 at update 6
        b.extend_from_slice(&0.4f32.to_le_bytes());
        b.extend_from_slice(&6u32.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes()); // latent 0: (0,0) at 7, (0,1) at 5
        for (j, last, v0, v1) in [(0u32, 7u32, 0.25f32, 0.5f32), (1, 5, 0.8, 0.6)] {
            for x in [
                j.to_le_bytes(),
                last.to_le_bytes(),
                v0.to_le_bytes(),
                v1.to_le_bytes(),
            ] {
                b.extend_from_slice(&x);
            }
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // latent 1: none
        let mut ema = PairEma::<2>::new(2, m, 0.0, 16);
        ema.load_bytes(&b).unwrap();
        assert_eq!((ema.t, ema.evicted, ema.entries()), (7, 11, 2));
        assert_eq!(ema.read(&ema.lists[0][0]), [0.25, 0.5]);
        assert_eq!(ema.read(&ema.lists[0][1]), [0.2, 0.15]);
        assert_eq!(ema.cut, Some((0.2, 6)));
        // The one-value store of self-correcting keeps the first (equal) value.
        let mut one = PairEma::<1>::new(2, m, 0.0, 16);
        one.load_bytes(&b).unwrap();
        assert_eq!(one.read(&one.lists[0][1]), [0.2]);
    }

    #[test]
    fn ema_bound_drops_smallest_pairs() {
        // Pairs (0,1)=0.9, (0,2)=0.1, (1,3)=0.5, (2,3)=0.3.
        let vals = |a: u32, b: u32| -> f32 {
            match (a, b) {
                (0, 1) => 0.9,
                (0, 2) => 0.1,
                (1, 3) => 0.5,
                (2, 3) => 0.3,
                _ => unreachable!(),
            }
        };
        let mut pos = vec![u32::MAX; 4];
        let mut sv = vec![[0f32; 2]; 4];
        // One update; `nbrs[i]` are latent i's partners (none: a walk that only decays).
        let mut update = |ema: &mut PairEma<2>, nbrs: [&[u32]; 4]| {
            let w = ema.begin();
            let mut evicted = 0;
            for (i, list) in ema.lists.iter_mut().enumerate() {
                evicted += PairEma::update_list(&w, list, nbrs[i], &mut pos, &mut sv, |j| {
                    [vals(i as u32, j), 0.0]
                });
            }
            ema.evicted += evicted;
        };
        let kept = |ema: &PairEma<2>| -> Vec<(usize, u32)> {
            ema.lists
                .iter()
                .enumerate()
                .flat_map(|(i, l)| l.iter().map(move |e| (i, e.j)))
                .collect()
        };
        let all: [&[u32]; 4] = [&[1, 2], &[3], &[3], &[]];
        let none: [&[u32]; 4] = [&[], &[], &[], &[]];
        // Far above the bound (4 > 1.5 x 2): evicted at once, down to 3/4 of it.
        let mut far = PairEma::<2>::new(4, 0.5, 0.0, 2);
        update(&mut far, all);
        far.enforce_bound();
        assert_eq!((kept(&far), far.evicted), (vec![(0, 1)], 3));
        // Just above (4 > 3): the cutoff keeping 3/4 of the bound (0.3) is evicted by
        // the next update's walks, at a decayed value, then forgotten.
        let mut ema = PairEma::<2>::new(4, 0.5, 0.0, 3);
        update(&mut ema, all);
        assert_eq!(ema.entries(), 4);
        ema.enforce_bound();
        assert_eq!((ema.entries(), ema.evicted), (4, 0));
        update(&mut ema, none);
        assert_eq!(kept(&ema), vec![(0, 1), (1, 3)]);
        assert_eq!(ema.evicted, 2);
        ema.enforce_bound();
        assert!(ema.cut.is_none());
        // Lazy decay: (0,1), written at update 1, reads 0.9 * 0.5 at update 2.
        assert!((ema.read(&ema.lists[0][0])[0] - 0.45).abs() < 1e-7);
        ema.begin();
        assert!((ema.read(&ema.lists[0][0])[0] - 0.225).abs() < 1e-7);
        let bytes = ema.to_bytes();
        let mut back = PairEma::<2>::new(4, 0.5, 0.0, 3);
        back.load_bytes(&bytes).unwrap();
        assert_eq!(
            (back.lists.clone(), back.t, back.evicted),
            (ema.lists.clone(), ema.t, ema.evicted)
        );
        assert!(back.load_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert!(PairEma::<2>::new(5, 0.5, 0.0, 3)
            .load_bytes(&bytes)
            .is_err());
        // A pending cutoff survives a checkpoint.
        ema.cut = Some((0.25, ema.t));
        back.load_bytes(&ema.to_bytes()).unwrap();
        assert_eq!(back.cut, ema.cut);
    }
}
