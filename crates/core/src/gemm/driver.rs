//! The blocked (Goto/BLIS-style) GEMM driver shared by every microkernel.
//!
//! Loop nest, outermost first: depth blocks (`kc`), row blocks (`mc`, A block packed
//! here — large, it lives in L3 and is packed once per depth block), column blocks (`nc`,
//! B block packed here, sized to stay in L2), then `mr`-tall rows of micro-tiles, then
//! `nr`-wide micro-tiles handed to the kernel. The innermost loop keeps one A micro-panel
//! (`kc x MR`, the broadcast operand) in L1 and streams B micro-panels (the vector
//! operand) from L2 — the BLIS arrangement with the roles of A and B swapped, because our
//! vectors run along the rows of C. Packing copies each operand into the exact order the
//! kernel streams it (zero-padded to whole tiles), so any stride combination — row-major,
//! transposed views, arbitrary steps — runs the same inner loop at the same speed.
//!
//! Parallelism: C is cut into independent tasks (column ranges when N is wide, row ranges
//! otherwise); each task packs its own panels into thread-local buffers, so threads never
//! share a mutable buffer and no call allocates once the buffers have grown.

use super::SyncPtr;
use rayon::prelude::*;
use std::cell::RefCell;

/// A read-only strided operand: element (i, j) is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// The output operand.
#[derive(Clone, Copy)]
pub(crate) struct ViewMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: tasks write disjoint tiles of C and only read A and B; the public entry points
// hold the borrows of the underlying slices for the whole call.
unsafe impl Send for View {}
unsafe impl Sync for View {}
unsafe impl Send for ViewMut {}
unsafe impl Sync for ViewMut {}

impl View {
    #[inline(always)]
    pub unsafe fn at(&self, i: usize, j: usize) -> *const f32 {
        self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// A B operand stored as bf16 (`half::bf16` bits): element (i, j) is at
/// `ptr + i * rs + j * cs`; widened to f32 while packing, so the kernel is unchanged.
#[derive(Clone, Copy)]
pub(crate) struct BfView {
    pub ptr: *const u16,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: read-only, as for `View`.
unsafe impl Send for BfView {}
unsafe impl Sync for BfView {}

impl BfView {
    #[inline(always)]
    pub unsafe fn at(&self, i: usize, j: usize) -> *const u16 {
        self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// bf16 bits to f32: bf16 is the upper half of an f32.
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Anything the driver can pack as the B operand.
pub(crate) trait BSource<K: Kernel>: Copy + Send + Sync {
    /// Same contract as [`Kernel::pack_b`].
    unsafe fn pack(&self, dst: *mut f32, pc: usize, kc: usize, j0: usize, nc: usize);
}

impl<K: Kernel> BSource<K> for View {
    #[inline]
    unsafe fn pack(&self, dst: *mut f32, pc: usize, kc: usize, j0: usize, nc: usize) {
        K::pack_b(dst, *self, pc, kc, j0, nc)
    }
}

impl<K: Kernel> BSource<K> for BfView {
    #[inline]
    unsafe fn pack(&self, dst: *mut f32, pc: usize, kc: usize, j0: usize, nc: usize) {
        K::pack_b_bf16(dst, *self, pc, kc, j0, nc)
    }
}

/// A microkernel: computes an `MR x NR` tile of `A_panel * B_panel` over `kc` steps and
/// writes `alpha * acc + beta * C` into the first `mr x nr` entries of the C tile.
pub(crate) trait Kernel {
    const MR: usize;
    const NR: usize;
    /// Depth of one packed block (the A micro-panel `kc x MR` should stay in L1).
    const KC: usize;
    /// Rows of A packed at once (the `mc x kc` block lives in L3).
    const MC: usize;
    /// Columns of B packed at once (the `kc x nc` block should stay in L2).
    const NC: usize;

    /// # Safety
    /// `a` holds `kc * MR` packed floats, `b` holds `kc * NR` packed floats (64-byte
    /// aligned), `c` addresses an `mr x nr` tile with strides `rsc`, `csc`; `beta == 0`
    /// must not read C.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    );

    /// Pack B rows `pc..pc+kc`, columns `j0..j0+nc` as `ceil(nc/NR)` panels of
    /// `kc x NR` (row p of a panel contiguous), zero-padding the last panel.
    ///
    /// # Safety
    /// `dst` has room for `kc * round_up(nc, NR)` floats; the B range is in bounds.
    unsafe fn pack_b(dst: *mut f32, b: View, pc: usize, kc: usize, j0: usize, nc: usize) {
        pack_b_generic(Self::NR, dst, b, pc, kc, j0, nc)
    }

    /// [`Kernel::pack_b`] for a bf16 B, widening to f32.
    ///
    /// # Safety
    /// As for `pack_b`.
    unsafe fn pack_b_bf16(dst: *mut f32, b: BfView, pc: usize, kc: usize, j0: usize, nc: usize) {
        pack_b_bf16_generic(Self::NR, dst, b, pc, kc, j0, nc)
    }

    /// Pack A rows `i0..i0+mc`, columns `pc..pc+kc` as `ceil(mc/MR)` panels of
    /// `kc x MR` (column p of a panel contiguous), zero-padding the last panel.
    ///
    /// # Safety
    /// `dst` has room for `kc * round_up(mc, MR)` floats; the A range is in bounds.
    unsafe fn pack_a(dst: *mut f32, a: View, i0: usize, mc: usize, pc: usize, kc: usize) {
        pack_a_generic(Self::MR, dst, a, i0, mc, pc, kc)
    }
}

/// Portable B packing; picks the loop order that reads B contiguously.
pub(crate) unsafe fn pack_b_generic(
    nr_t: usize,
    dst: *mut f32,
    b: View,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) {
    let panels = nc.div_ceil(nr_t);
    for jp in 0..panels {
        let jb = j0 + jp * nr_t;
        let w = nr_t.min(nc - jp * nr_t);
        let d = dst.add(jp * kc * nr_t);
        if b.cs == 1 {
            for p in 0..kc {
                let src = b.at(pc + p, jb);
                let drow = d.add(p * nr_t);
                std::ptr::copy_nonoverlapping(src, drow, w);
                for jj in w..nr_t {
                    *drow.add(jj) = 0.0;
                }
            }
        } else {
            // Column-contiguous (transposed) B: walk each column down, scatter into rows.
            for jj in 0..nr_t {
                if jj < w {
                    let src = b.at(pc, jb + jj);
                    for p in 0..kc {
                        *d.add(p * nr_t + jj) = *src.offset(p as isize * b.rs);
                    }
                } else {
                    for p in 0..kc {
                        *d.add(p * nr_t + jj) = 0.0;
                    }
                }
            }
        }
    }
}

/// Portable bf16 B packing (same layout as [`pack_b_generic`]).
pub(crate) unsafe fn pack_b_bf16_generic(
    nr_t: usize,
    dst: *mut f32,
    b: BfView,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) {
    let panels = nc.div_ceil(nr_t);
    for jp in 0..panels {
        let jb = j0 + jp * nr_t;
        let w = nr_t.min(nc - jp * nr_t);
        let d = dst.add(jp * kc * nr_t);
        if b.cs == 1 {
            for p in 0..kc {
                let src = b.at(pc + p, jb);
                let drow = d.add(p * nr_t);
                for jj in 0..nr_t {
                    *drow.add(jj) = if jj < w {
                        bf16_bits_to_f32(*src.add(jj))
                    } else {
                        0.0
                    };
                }
            }
        } else {
            for jj in 0..nr_t {
                for p in 0..kc {
                    *d.add(p * nr_t + jj) = if jj < w {
                        bf16_bits_to_f32(*b.at(pc + p, jb + jj))
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Portable A packing; picks the loop order that reads A contiguously.
pub(crate) unsafe fn pack_a_generic(
    mr_t: usize,
    dst: *mut f32,
    a: View,
    i0: usize,
    mc: usize,
    pc: usize,
    kc: usize,
) {
    let panels = mc.div_ceil(mr_t);
    for ip in 0..panels {
        let ib = i0 + ip * mr_t;
        let h = mr_t.min(mc - ip * mr_t);
        let d = dst.add(ip * kc * mr_t);
        if a.rs == 1 {
            // Transposed A (column-contiguous): each packed column is a straight copy.
            for p in 0..kc {
                let src = a.at(ib, pc + p);
                let dcol = d.add(p * mr_t);
                std::ptr::copy_nonoverlapping(src, dcol, h);
                for ii in h..mr_t {
                    *dcol.add(ii) = 0.0;
                }
            }
        } else {
            for ii in 0..mr_t {
                if ii < h {
                    let src = a.at(ib + ii, pc);
                    for p in 0..kc {
                        *d.add(p * mr_t + ii) = *src.offset(p as isize * a.cs);
                    }
                } else {
                    for p in 0..kc {
                        *d.add(p * mr_t + ii) = 0.0;
                    }
                }
            }
        }
    }
}

/// 64-byte aligned growable scratch (packed panels are read with aligned vector loads).
#[derive(Default)]
struct AlignedBuf {
    chunks: Vec<Align64>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([f32; 16]);

impl AlignedBuf {
    fn ptr(&mut self, floats: usize) -> *mut f32 {
        let need = floats.div_ceil(16);
        if self.chunks.len() < need {
            self.chunks.resize(need, Align64([0.0; 16]));
        }
        self.chunks.as_mut_ptr() as *mut f32
    }
}

#[derive(Default)]
struct Scratch {
    a: AlignedBuf,
    b: AlignedBuf,
    c: AlignedBuf,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// [`gemm_tiles_blocked`]'s own buffers (its packed A spans every depth block).
    static TILE_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Run `f` on this thread's scratch buffers of `key`, or on fresh private ones if they
/// are already in use further up this thread's stack.
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<Scratch>>,
    f: impl FnOnce(&mut Scratch) -> R,
) -> R {
    key.with(|s| match s.try_borrow_mut() {
        Ok(mut g) => f(&mut g),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Block sizes for one call: `kc` and `mc` split their dimension into equal blocks, so
/// k = 576 becomes 3 x 192 rather than 256 + 256 + 64 (no short, inefficient tail block).
#[derive(Clone, Copy)]
struct Blocking {
    kc: usize,
    mc: usize,
    nc: usize,
}

fn blocking<K: Kernel>(m: usize, n: usize, k: usize) -> Blocking {
    let kb = k.div_ceil(K::KC);
    let kc = k.div_ceil(kb);
    let mb = m.div_ceil(K::MC);
    let mc = m.div_ceil(mb).next_multiple_of(K::MR);
    let nb = n.div_ceil(K::NC);
    let nc = n.div_ceil(nb).next_multiple_of(K::NR);
    Blocking { kc, mc, nc }
}

/// One rectangular piece of C, computed by a single thread.
#[derive(Clone, Copy)]
struct Task {
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_task<K: Kernel, B: BSource<K>>(
    t: Task,
    k: usize,
    blk: Blocking,
    alpha: f32,
    a: View,
    b: B,
    beta: f32,
    c: ViewMut,
) {
    // A re-entrant use on this thread (not expected: tasks never call back into rayon)
    // gets private buffers instead of a panic.
    with_scratch(&SCRATCH, |scratch| {
        let nc_max = blk.nc.min((t.j1 - t.j0).next_multiple_of(K::NR));
        let mc_max = blk.mc.min((t.i1 - t.i0).next_multiple_of(K::MR));
        let bbuf = scratch.b.ptr(blk.kc * nc_max);
        let abuf = scratch.a.ptr(blk.kc * mc_max);
        let mut pc = 0;
        while pc < k {
            let kc = blk.kc.min(k - pc);
            let beta_eff = if pc == 0 { beta } else { 1.0 };
            let mut ic = t.i0;
            while ic < t.i1 {
                let mc = blk.mc.min(t.i1 - ic);
                K::pack_a(abuf, a, ic, mc, pc, kc);
                let mut jc = t.j0;
                while jc < t.j1 {
                    let nc = blk.nc.min(t.j1 - jc);
                    b.pack(bbuf, pc, kc, jc, nc);
                    macro_tile::<K>(kc, mc, nc, abuf, bbuf, alpha, beta_eff, c, ic, jc);
                    jc += nc;
                }
                ic += mc;
            }
            pc += kc;
        }
    })
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn macro_tile<K: Kernel>(
    kc: usize,
    mc: usize,
    nc: usize,
    abuf: *const f32,
    bbuf: *const f32,
    alpha: f32,
    beta: f32,
    c: ViewMut,
    ic: usize,
    jc: usize,
) {
    let np = nc.div_ceil(K::NR);
    let mp = mc.div_ceil(K::MR);
    for ir in 0..mp {
        let ap = abuf.add(ir * kc * K::MR);
        let mr = K::MR.min(mc - ir * K::MR);
        let i = ic + ir * K::MR;
        for jr in 0..np {
            let bp = bbuf.add(jr * kc * K::NR);
            let nr = K::NR.min(nc - jr * K::NR);
            let j = jc + jr * K::NR;
            let cp = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
            K::kernel(kc, ap, bp, cp, c.rs, c.cs, mr, nr, alpha, beta);
        }
    }
}

/// `C = alpha * A * B + beta * C` for `m, n, k > 0` with the kernel `K`.
///
/// # Safety
/// The views must address `m x k`, `k x n` and `m x n` in-bounds elements, C must not
/// alias A or B, and no two elements of C may share an address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_blocked<K: Kernel, B: BSource<K>>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: View,
    b: B,
    beta: f32,
    c: ViewMut,
    threads: usize,
) {
    let blk = blocking::<K>(m, n, k);
    let n_panels = n.div_ceil(K::NR);
    let m_panels = m.div_ceil(K::MR);
    if threads <= 1 || (n_panels < 2 && m_panels < 2) {
        run_task::<K, B>(
            Task {
                i0: 0,
                i1: m,
                j0: 0,
                j1: n,
            },
            k,
            blk,
            alpha,
            a,
            b,
            beta,
            c,
        );
        return;
    }
    let tasks = split_tasks::<K>(m, n, threads);
    tasks
        .par_iter()
        .for_each(|&t| run_task::<K, B>(t, k, blk, alpha, a, b, beta, c));
}

/// Cut C into tasks. Splitting N makes every task pack all of A (its rows), splitting M
/// makes every task pack all of B, so split the dimension whose duplicated operand is
/// smaller (N when m <= n). Use two tasks per thread — so a thread slowed by another
/// process hands work to the other — when the split dimension is long enough that the
/// extra packing stays around 1% of the multiply, else one per thread.
fn split_tasks<K: Kernel>(m: usize, n: usize, threads: usize) -> Vec<Task> {
    let split_n = m <= n;
    let (len, unit) = if split_n { (n, K::NR) } else { (m, K::MR) };
    let panels = len.div_ceil(unit);
    let per_task_min = 1024;
    let count = if len / (2 * threads) >= per_task_min {
        2 * threads
    } else {
        threads
    };
    let count = count.min(panels);
    let mut tasks = Vec::with_capacity(count);
    for t in 0..count {
        let p0 = panels * t / count;
        let p1 = panels * (t + 1) / count;
        if p1 > p0 {
            let (x0, x1) = (p0 * unit, (p1 * unit).min(len));
            tasks.push(if split_n {
                Task {
                    i0: 0,
                    i1: m,
                    j0: x0,
                    j1: x1,
                }
            } else {
                Task {
                    i0: x0,
                    i1: x1,
                    j0: 0,
                    j1: n,
                }
            });
        }
    }
    tasks
}

/// One finished block of `A * B` handed to a [`gemm_tiles_blocked`] consumer: rows
/// `row0..row0 + rows`, columns `col0..col0 + cols`, row `i` at `data[i * stride..]`.
pub struct Tile<'t> {
    pub row0: usize,
    pub col0: usize,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub data: &'t [f32],
}

impl Tile<'_> {
    /// Row `i` of the tile (`cols` values).
    #[inline]
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.stride..i * self.stride + self.cols]
    }
}

/// Rows of C finished per tile: the tile stays in L2 across the depth blocks and while
/// the consumer reads it.
const TILE_MR_PANELS: usize = 8;

/// Columns per tile for depth `k`. The packed B block spans every depth block (`k x nc`
/// floats); measured with `cargo bench -p saelab-sae --bench encoder` (docs/benchmarks-sae.md),
/// 512 columns (a 1.1 MiB block) was fastest at k = 576 and 128-256 at k = 2304, so the
/// block is kept near 1.5 MiB, at most 512 columns. `SAELAB_TILE_NC` overrides it
/// (benchmarks).
fn tile_nc<K: Kernel>(k: usize) -> usize {
    static NC: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let env = *NC.get_or_init(|| {
        std::env::var("SAELAB_TILE_NC")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v > 0)
    });
    match env {
        Some(nc) => nc.next_multiple_of(K::NR),
        None => ((384 * 1024 / k.max(1)).clamp(K::NR, 512) / K::NR) * K::NR,
    }
}

/// Packed-A buffers of [`gemm_tiles_blocked`], kept between calls (a training step calls
/// it once per batch with the same shapes; fresh buffers would page-fault every time).
static TILE_A_POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// A row range of C, its consumer state and its packed A (every depth block).
struct RowTask<S> {
    i0: usize,
    i1: usize,
    state: S,
    abuf: AlignedBuf,
}

/// `A * B` delivered as finished tiles to `tile(state, ..)` instead of being written to a
/// C matrix. C is cut into row tasks (at most two per thread), each with its own
/// consumer state (from `init(rows, cols)`), so a consumer sees every column of its rows
/// in increasing order. The column blocks are walked in order: each B block (all depth
/// blocks) is packed once, by all threads, then every row task computes its tiles from
/// it — each tile accumulating all depth blocks in a small per-thread buffer, so the
/// product is never stored and the consumer reads it from cache. Returns the states in
/// row order. The accumulation order equals [`gemm_blocked`]'s, so the values are
/// bit-identical to its output with `alpha = 1, beta = 0`.
///
/// # Safety
/// The views must address `m x k` and `k x n` in-bounds elements, `m, n, k > 0`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_tiles_blocked<K: Kernel, S: Send>(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    threads: usize,
    init: &(dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>) -> S + Sync),
    tile: &(dyn Fn(&mut S, &Tile) + Sync),
) -> Vec<S> {
    let blk = blocking::<K>(m, n, k);
    let depth: Vec<(usize, usize)> = (0..k)
        .step_by(blk.kc)
        .map(|pc| (pc, blk.kc.min(k - pc)))
        .collect();
    let tile_rows = K::MR * TILE_MR_PANELS;
    let nc_t = tile_nc::<K>(k);
    let n_tiles = m.div_ceil(tile_rows);
    let count = if threads <= 1 {
        1
    } else {
        (2 * threads).min(n_tiles)
    };
    let mut pool = std::mem::take(&mut *TILE_A_POOL.lock().unwrap_or_else(|e| e.into_inner()));
    let mut tasks: Vec<RowTask<S>> = (0..count)
        .map(|t| {
            let i0 = (n_tiles * t / count) * tile_rows;
            let i1 = ((n_tiles * (t + 1) / count) * tile_rows).min(m);
            RowTask {
                i0,
                i1,
                state: init(i0..i1, 0..n),
                abuf: pool.pop().unwrap_or_default(),
            }
        })
        .collect();
    // A packed once per task for every depth block: block `pc` starts at `pc * m_pad`.
    let pack_a = |t: &mut RowTask<S>| {
        let m_pad = (t.i1 - t.i0).next_multiple_of(K::MR);
        let ap = t.abuf.ptr(k * m_pad);
        for &(pc, kc) in &depth {
            K::pack_a(ap.add(pc * m_pad), a, t.i0, t.i1 - t.i0, pc, kc);
        }
    };
    let mut bbuf = pool.pop().unwrap_or_default();
    let bp = SyncPtr(bbuf.ptr(k * nc_t));
    let run = |t: &mut RowTask<S>, jc: usize, nc: usize| {
        let nc_pad = nc.next_multiple_of(K::NR);
        let m_pad = (t.i1 - t.i0).next_multiple_of(K::MR);
        let ap = t.abuf.ptr(k * m_pad);
        // `tile` is user code: if it re-enters on this thread (a GEMM of its own, or a
        // rayon task stolen while it waits), that call gets a private buffer.
        with_scratch(&TILE_SCRATCH, |scratch| {
            let cp = scratch.c.ptr(tile_rows * nc_t);
            let c = ViewMut {
                ptr: cp,
                rs: nc as isize,
                cs: 1,
            };
            let mut ic = t.i0;
            while ic < t.i1 {
                let mc = tile_rows.min(t.i1 - ic);
                // Row `ic`'s panel inside each packed A depth block.
                let a_rows = ic - t.i0;
                for &(pc, kc) in &depth {
                    let beta = if pc == 0 { 0.0 } else { 1.0 };
                    macro_tile::<K>(
                        kc,
                        mc,
                        nc,
                        ap.add(pc * m_pad + a_rows * kc),
                        bp.get().add(pc * nc_pad),
                        1.0,
                        beta,
                        c,
                        0,
                        0,
                    );
                }
                let data = std::slice::from_raw_parts(cp, mc * nc);
                let view = Tile {
                    row0: ic,
                    col0: jc,
                    rows: mc,
                    cols: nc,
                    stride: nc,
                    data,
                };
                tile(&mut t.state, &view);
                ic += mc;
            }
        });
    };
    if count == 1 {
        pack_a(&mut tasks[0]);
    } else {
        tasks.par_iter_mut().for_each(pack_a);
    }
    let mut jc = 0;
    while jc < n {
        let nc = nc_t.min(n - jc);
        let nc_pad = nc.next_multiple_of(K::NR);
        let panels = nc.div_ceil(K::NR);
        // B block of every depth block, one `kc x NR` panel per job.
        let pack_b = |job: usize| {
            let (pc, kc) = depth[job / panels];
            let p = job % panels;
            let w = K::NR.min(nc - p * K::NR);
            // SAFETY: each job writes only its own panel of the shared B buffer.
            K::pack_b(
                bp.get().add(pc * nc_pad + p * kc * K::NR),
                b,
                pc,
                kc,
                jc + p * K::NR,
                w,
            );
        };
        if count == 1 {
            (0..depth.len() * panels).for_each(pack_b);
            run(&mut tasks[0], jc, nc);
        } else {
            (0..depth.len() * panels).into_par_iter().for_each(pack_b);
            tasks.par_iter_mut().for_each(|t| run(t, jc, nc));
        }
        jc += nc;
    }
    let mut states = Vec::with_capacity(count);
    for t in tasks {
        states.push(t.state);
        pool.push(t.abuf);
    }
    pool.push(bbuf);
    TILE_A_POOL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(pool);
    states
}
