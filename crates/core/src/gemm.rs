//! Single-precision matrix multiply on strided views: `C = alpha * A * B + beta * C`.
//!
//! The encoder matmul is the floor of an SAE step and the projections are the whole of
//! an LM forward, so this one entry point is what every hot path calls. Views carry a
//! row stride and a column stride, so transposes are free (`MatRef::t`).
//!
//! Implementation: a packed, blocked driver (`driver`) around an AVX-512 14 x 32
//! microkernel (`avx512`), chosen at run time with `is_x86_feature_detected!`; without
//! AVX-512 the multithreaded fallback is the `matrixmultiply` crate and the serial one a
//! portable kernel. Measurements: `docs/benchmarks.md` (`cargo bench -p saelab-core --bench gemm`).

pub mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod driver;
mod portable;

use half::bf16;

/// A read-only strided matrix view. Element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

/// A mutable strided matrix view.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix over `data` (row stride = cols).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "MatRef: buffer too small");
        MatRef {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[(i as isize * self.rs + j as isize * self.cs) as usize]
    }

    /// The driver's raw view of the same elements.
    fn view(&self) -> driver::View {
        driver::View {
            ptr: self.data.as_ptr(),
            rs: self.rs,
            cs: self.cs,
        }
    }

    fn check(&self) {
        check_view(
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len(),
            "MatRef",
        );
    }
}

impl<'a> MatMut<'a> {
    /// The driver's raw view of the same elements.
    fn view_mut(&mut self) -> driver::ViewMut {
        driver::ViewMut {
            ptr: self.data.as_mut_ptr(),
            rs: self.rs,
            cs: self.cs,
        }
    }

    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "MatMut: buffer too small");
        MatMut {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    fn check(&self) {
        check_view(
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len(),
            "MatMut",
        );
    }
}

/// Every element of a strided view lies inside its buffer (and strides are >= 0).
fn check_view(rows: usize, cols: usize, rs: isize, cs: isize, len: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(rs >= 0 && cs >= 0, "negative strides unsupported");
    let last = (rows as isize - 1) * rs + (cols as isize - 1) * cs;
    assert!((last as usize) < len, "{what} out of bounds");
}

/// Threads for a product of `m * n * k` multiply-adds (see [`SERIAL_BELOW`]).
fn threads_for(m: usize, n: usize, k: usize) -> usize {
    if m.saturating_mul(n).saturating_mul(k) < SERIAL_BELOW {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// `C = alpha * A * B + beta * C`. Shapes: A m x k, B k x n, C m x n.
/// With `beta == 0`, C's previous contents are ignored (NaNs in C do not propagate).
///
/// Multithreaded over rayon's pool when the product is large enough to amortise a fork
/// (see [`SERIAL_BELOW`]); smaller calls run on the calling thread, as [`gemm_serial`].
pub fn gemm(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    let (m, k, n) = check_shapes(&a, &b, &c);
    let threads = threads_for(m, n, k);
    gemm_dispatch(m, n, k, alpha, a, b, beta, c, threads);
}

/// Same contract as [`gemm`], always on the calling thread (never spawns or joins
/// threads): for callers that already parallelise, e.g. per attention head.
pub fn gemm_serial(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    let (m, k, n) = check_shapes(&a, &b, &c);
    gemm_dispatch(m, n, k, alpha, a, b, beta, c, 1);
}

pub use driver::Tile;

/// A raw pointer that rayon tasks may share to write disjoint elements of one buffer
/// (the tiled GEMM's shared packed block, the SAE kernels' per-entry outputs). Each use
/// states why its writes are disjoint.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);
// SAFETY: the wrapper only moves the address between threads; every dereference is an
// `unsafe` block at the use site that writes elements no other task writes.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// `A * B` (A m x k, B k x n) consumed tile by tile instead of stored: the product is
/// cut into the same independent tasks as [`gemm`] (column ranges when `m <= n`); each
/// task starts from `init(rows, cols)` of its block and gets `tile(state, tile)` for
/// every finished block of rows x columns, while it is still in cache. Returns the task
/// states in task order. The tiles' values are bit-identical to `gemm`'s `A * B`.
///
/// This is how a TopK encoder selects its k largest pre-activations without writing the
/// `[B, F]` pre-activation matrix to memory and reading it back.
pub fn gemm_tiles<S: Send>(
    a: MatRef,
    b: MatRef,
    init: &(dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>) -> S + Sync),
    tile: &(dyn Fn(&mut S, &Tile) + Sync),
) -> Vec<S> {
    assert_eq!(a.cols, b.rows, "gemm_tiles: inner dimensions differ");
    a.check();
    b.check();
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return Vec::new();
    }
    if k == 0 {
        // An empty sum: zero tiles, one task.
        let zeros = vec![0f32; m * n];
        let mut s = init(0..m, 0..n);
        tile(
            &mut s,
            &Tile {
                row0: 0,
                col0: 0,
                rows: m,
                cols: n,
                stride: n,
                data: &zeros,
            },
        );
        return vec![s];
    }
    let threads = threads_for(m, n, k);
    let av = a.view();
    let bv = b.view();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: shapes and bounds were checked above; the tiles are private buffers.
        return unsafe {
            driver::gemm_tiles_blocked::<avx512::Avx512Main, S>(
                m, n, k, av, bv, threads, init, tile,
            )
        };
    }
    // SAFETY: as above.
    unsafe {
        driver::gemm_tiles_blocked::<portable::Portable, S>(m, n, k, av, bv, threads, init, tile)
    }
}

/// Products with fewer than this many multiply-adds (`m * n * k`) run single-threaded in
/// [`gemm`]: below ~2 M FMAs (about 15 us on one core) a rayon fork/join costs more than
/// the second core saves, and the small per-head attention GEMMs land here.
pub const SERIAL_BELOW: usize = 1 << 21;

/// The kernel family [`gemm`] uses on this CPU (for logs and benchmark reports).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return "avx512-14x32";
    }
    "matrixmultiply (threaded) / portable-8x8 (serial)"
}

fn check_shapes(a: &MatRef, b: &MatRef, c: &MatMut) -> (usize, usize, usize) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert_eq!(a.rows, c.rows, "gemm: A rows != C rows");
    assert_eq!(b.cols, c.cols, "gemm: B cols != C cols");
    a.check();
    b.check();
    c.check();
    (a.rows, a.cols, b.cols)
}

/// True when distinct (i, j) of C map to distinct addresses — required for writing
/// tiles independently (and from several threads).
fn c_is_injective(c: &MatMut) -> bool {
    let (rs, cs) = (c.rs as usize, c.cs as usize);
    let (rows, cols) = (c.rows, c.cols);
    if rows <= 1 && cols <= 1 {
        return true;
    }
    if rows <= 1 {
        return cs > 0;
    }
    if cols <= 1 {
        return rs > 0;
    }
    // The smaller stride's whole extent must fit inside one step of the larger one.
    let ((s_small, d_small), s_large) = if rs <= cs {
        ((rs, rows), cs)
    } else {
        ((cs, cols), rs)
    };
    s_small > 0 && s_large >= s_small * d_small
}

#[allow(clippy::too_many_arguments)]
fn gemm_dispatch(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    mut c: MatMut,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        scale_c(beta, c);
        return;
    }
    if !c_is_injective(&c) {
        // Overlapping output elements (a zero or interleaved stride): only a sequential
        // element order has a defined result.
        gemm_reference(alpha, a, b, beta, c);
        return;
    }
    let av = a.view();
    let bv = b.view();
    let cv = c.view_mut();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: shapes and bounds were checked by `check_shapes`; C is injective and
        // exclusively borrowed, so tiles written by different tasks never overlap.
        unsafe {
            driver::gemm_blocked::<avx512::Avx512Main, _>(m, n, k, alpha, av, bv, beta, cv, threads)
        };
        return;
    }
    if threads <= 1 {
        // SAFETY: as above.
        unsafe {
            driver::gemm_blocked::<portable::Portable, _>(m, n, k, alpha, av, bv, beta, cv, 1)
        };
        return;
    }
    // SAFETY: as above; matrixmultiply takes the same (ptr, rs, cs) description and,
    // like our kernels, does not read C when beta == 0.
    unsafe {
        matrixmultiply::sgemm(
            m, k, n, alpha, av.ptr, a.rs, a.cs, bv.ptr, b.rs, b.cs, beta, cv.ptr, c.rs, c.cs,
        );
    }
}

/// A read-only strided bf16 matrix view (e.g. weights kept in bf16 to halve their
/// memory); element (i, j) is `data[i * rs + j * cs]`. Used as the B operand of
/// [`gemm_bf16b`], widened to f32 while packing.
#[derive(Clone, Copy, Debug)]
pub struct BfMatRef<'a> {
    pub data: &'a [bf16],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> BfMatRef<'a> {
    /// A row-major `rows x cols` matrix over `data` (row stride = cols).
    pub fn row_major(data: &'a [bf16], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "BfMatRef: buffer too small");
        BfMatRef {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        BfMatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Element (i, j) widened to f32.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[(i as isize * self.rs + j as isize * self.cs) as usize].to_f32()
    }

    fn check(&self) {
        check_view(
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len(),
            "BfMatRef",
        );
    }
}

/// `C = alpha * A * B + beta * C` with B stored as bf16 (products and sums in f32, as if
/// B had been converted to f32 first). Same contract and threading as [`gemm`].
pub fn gemm_bf16b(alpha: f32, a: MatRef, b: BfMatRef, beta: f32, c: MatMut) {
    let (m, k, n) = check_shapes_bf16(&a, &b, &c);
    let threads = threads_for(m, n, k);
    gemm_bf16b_dispatch(m, n, k, alpha, a, b, beta, c, threads);
}

/// [`gemm_bf16b`] on the calling thread only (never spawns or joins threads).
pub fn gemm_bf16b_serial(alpha: f32, a: MatRef, b: BfMatRef, beta: f32, c: MatMut) {
    let (m, k, n) = check_shapes_bf16(&a, &b, &c);
    gemm_bf16b_dispatch(m, n, k, alpha, a, b, beta, c, 1);
}

fn check_shapes_bf16(a: &MatRef, b: &BfMatRef, c: &MatMut) -> (usize, usize, usize) {
    assert_eq!(a.cols, b.rows, "gemm_bf16b: inner dimensions differ");
    assert_eq!(a.rows, c.rows, "gemm_bf16b: A rows != C rows");
    assert_eq!(b.cols, c.cols, "gemm_bf16b: B cols != C cols");
    a.check();
    b.check();
    c.check();
    (a.rows, a.cols, b.cols)
}

#[allow(clippy::too_many_arguments)]
fn gemm_bf16b_dispatch(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef,
    b: BfMatRef,
    beta: f32,
    mut c: MatMut,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        scale_c(beta, c);
        return;
    }
    if !c_is_injective(&c) {
        // Overlapping output elements: sequential reference order (see `gemm_dispatch`).
        let bf: Vec<f32> = b.data.iter().map(|x| x.to_f32()).collect();
        let bv = MatRef {
            data: &bf,
            rows: b.rows,
            cols: b.cols,
            rs: b.rs,
            cs: b.cs,
        };
        gemm_reference(alpha, a, bv, beta, c);
        return;
    }
    let av = a.view();
    // `half::bf16` is `repr(transparent)` over its u16 bit pattern.
    let bv = driver::BfView {
        ptr: b.data.as_ptr() as *const u16,
        rs: b.rs,
        cs: b.cs,
    };
    let cv = c.view_mut();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: as in `gemm_dispatch`.
        unsafe {
            driver::gemm_blocked::<avx512::Avx512Main, _>(m, n, k, alpha, av, bv, beta, cv, threads)
        };
        return;
    }
    // SAFETY: as in `gemm_dispatch`.
    unsafe {
        driver::gemm_blocked::<portable::Portable, _>(m, n, k, alpha, av, bv, beta, cv, threads)
    };
}

fn scale_c(beta: f32, c: MatMut) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let idx = (i as isize * c.rs + j as isize * c.cs) as usize;
            c.data[idx] = if beta == 0.0 { 0.0 } else { beta * c.data[idx] };
        }
    }
}

/// Reference triple loop in f64, for tests of every fast kernel.
pub fn gemm_reference(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += a.at(i, p) as f64 * b.at(p, j) as f64;
            }
            let idx = (i as isize * c.rs + j as isize * c.cs) as usize;
            let prev = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c.data[idx] as f64
            };
            c.data[idx] = (alpha as f64 * acc + prev) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    type GemmFn = fn(f32, MatRef, MatRef, f32, MatMut);

    fn assert_close(got: &[f32], want: &[f32], k: usize, what: &str) {
        for (idx, (x, y)) in got.iter().zip(want).enumerate() {
            let tol = 1e-4 * (1.0 + y.abs()) * (k.max(1) as f32).sqrt();
            assert!((x - y).abs() <= tol, "{what}: element {idx}: {x} vs {y}");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_with(
        f: GemmFn,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) {
        let mut r = Rng::new((m * 31 + k * 7 + n) as u64);
        let mut a = vec![0f32; m * k];
        let mut b = vec![0f32; k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut b, 1.0);
        let mut c0 = vec![0f32; m * n];
        r.fill_normal(&mut c0, 1.0);
        let av = if ta {
            MatRef::row_major(&a, k, m).t()
        } else {
            MatRef::row_major(&a, m, k)
        };
        let bv = if tb {
            MatRef::row_major(&b, n, k).t()
        } else {
            MatRef::row_major(&b, k, n)
        };
        let mut c1 = c0.clone();
        let mut c2 = c0.clone();
        f(alpha, av, bv, beta, MatMut::row_major(&mut c1, m, n));
        gemm_reference(alpha, av, bv, beta, MatMut::row_major(&mut c2, m, n));
        assert_close(
            &c1,
            &c2,
            k,
            &format!("({m},{k},{n}) ta={ta} tb={tb} alpha={alpha} beta={beta}"),
        );
    }

    const TRANSPOSES: [(bool, bool); 4] =
        [(false, false), (true, false), (false, true), (true, true)];

    #[test]
    fn matches_reference_on_random_shapes() {
        // Edges of the 14 x 32 tile, 16-lane vectors and the 16 x 16 transpose, plus
        // depths that split into several kc blocks.
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (14, 16, 32),
            (15, 17, 33),
            (13, 31, 31),
            (17, 33, 65),
            (29, 300, 47),
            (64, 128, 96),
            (130, 70, 33),
            (1, 64, 100),
            (100, 64, 1),
        ];
        for &(m, k, n) in &shapes {
            for &(ta, tb) in &TRANSPOSES {
                for f in [gemm as GemmFn, gemm_serial] {
                    check_with(f, m, k, n, ta, tb, 1.0, 0.0);
                    check_with(f, m, k, n, ta, tb, 0.5, 1.0);
                    check_with(f, m, k, n, ta, tb, -1.5, 0.25);
                }
            }
        }
    }

    #[test]
    fn large_blocked_and_threaded_shapes_match_reference() {
        // Above SERIAL_BELOW (threaded), k above one kc block, m above one mc block, and
        // n above one nc block (forcing several column tasks).
        for &(m, k, n) in &[(400, 600, 90), (70, 520, 300), (20, 30, 4200)] {
            for &(ta, tb) in &TRANSPOSES {
                check_with(gemm, m, k, n, ta, tb, 1.0, 0.0);
                check_with(gemm, m, k, n, ta, tb, 0.75, -0.5);
            }
        }
    }

    #[test]
    fn beta_zero_ignores_nan_in_c() {
        let (m, k, n) = (19, 23, 37);
        let mut r = Rng::new(5);
        let mut a = vec![0f32; m * k];
        let mut b = vec![0f32; k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut b, 1.0);
        for f in [gemm as GemmFn, gemm_serial] {
            let mut c = vec![f32::NAN; m * n];
            f(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                MatMut::row_major(&mut c, m, n),
            );
            let mut want = vec![0f32; m * n];
            gemm_reference(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                MatMut::row_major(&mut want, m, n),
            );
            assert_close(&c, &want, k, "beta=0 over NaN");
            // k == 0 and alpha == 0 take the scaling path, which must also overwrite.
            let mut c = vec![f32::NAN; m * n];
            f(
                1.0,
                MatRef::row_major(&a, m, 0),
                MatRef::row_major(&b, 0, n),
                0.0,
                MatMut::row_major(&mut c, m, n),
            );
            assert!(c.iter().all(|&x| x == 0.0));
            let mut c = vec![f32::NAN; m * n];
            f(
                0.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                MatMut::row_major(&mut c, m, n),
            );
            assert!(c.iter().all(|&x| x == 0.0));
        }
        // With beta != 0 a NaN in C must propagate (it is part of the result).
        let mut c = vec![0f32; m * n];
        c[7] = f32::NAN;
        gemm(
            1.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            1.0,
            MatMut::row_major(&mut c, m, n),
        );
        assert!(c[7].is_nan() && c.iter().filter(|x| x.is_nan()).count() == 1);
    }

    #[test]
    fn arbitrary_strides_match_reference() {
        // Sub-matrix views (row stride > cols), a column-major C, a C with column step 2,
        // and a B with both strides non-unit (the generic packing path).
        let (m, k, n) = (21, 45, 38);
        let mut r = Rng::new(11);
        let mut abuf = vec![0f32; 40 * 60];
        let mut bbuf = vec![0f32; 3 * 50 * 2 * 40];
        r.fill_normal(&mut abuf, 1.0);
        r.fill_normal(&mut bbuf, 1.0);
        let a = MatRef {
            data: &abuf,
            rows: m,
            cols: k,
            rs: 60,
            cs: 1,
        };
        let b_sets = [
            MatRef {
                data: &bbuf,
                rows: k,
                cols: n,
                rs: 41,
                cs: 1,
            },
            MatRef {
                data: &bbuf,
                rows: k,
                cols: n,
                rs: 1,
                cs: 47,
            },
            MatRef {
                data: &bbuf,
                rows: k,
                cols: n,
                rs: 2 * n as isize * 3,
                cs: 3,
            },
        ];
        for b in b_sets {
            for (rs, cs, len) in [
                (n as isize, 1, m * n),
                (1, m as isize, m * n),
                (2 * n as isize + 3, 2, m * (2 * n + 3)),
            ] {
                let mut c0 = vec![0f32; len];
                r.fill_normal(&mut c0, 1.0);
                for f in [gemm as GemmFn, gemm_serial] {
                    let mut c1 = c0.clone();
                    let mut c2 = c0.clone();
                    f(
                        0.5,
                        a,
                        b,
                        2.0,
                        MatMut {
                            data: &mut c1,
                            rows: m,
                            cols: n,
                            rs,
                            cs,
                        },
                    );
                    gemm_reference(
                        0.5,
                        a,
                        b,
                        2.0,
                        MatMut {
                            data: &mut c2,
                            rows: m,
                            cols: n,
                            rs,
                            cs,
                        },
                    );
                    assert_close(
                        &c1,
                        &c2,
                        k,
                        &format!("strides B=({},{}) C=({rs},{cs})", b.rs, b.cs),
                    );
                }
            }
        }
    }

    #[test]
    fn portable_kernel_matches_reference() {
        // The non-AVX-512 serial path, exercised directly so this machine tests it too.
        fn portable(alpha: f32, a: MatRef, b: MatRef, beta: f32, mut c: MatMut) {
            let (m, k, n) = (a.rows, a.cols, b.cols);
            let av = a.view();
            let bv = b.view();
            let cv = c.view_mut();
            unsafe {
                driver::gemm_blocked::<portable::Portable, _>(m, n, k, alpha, av, bv, beta, cv, 1)
            };
        }
        // The baseline body (what a CPU without AVX2/FMA runs), also threaded.
        fn baseline(alpha: f32, a: MatRef, b: MatRef, beta: f32, mut c: MatMut) {
            let (m, k, n) = (a.rows, a.cols, b.cols);
            let av = a.view();
            let bv = b.view();
            let cv = c.view_mut();
            unsafe {
                driver::gemm_blocked::<portable::PortableBaseline, _>(
                    m, n, k, alpha, av, bv, beta, cv, 2,
                )
            };
        }
        for &(m, k, n) in &[(1, 1, 1), (9, 17, 15), (70, 300, 20), (100, 40, 90)] {
            for &(ta, tb) in &TRANSPOSES {
                for f in [portable as GemmFn, baseline] {
                    check_with(f, m, k, n, ta, tb, 1.0, 0.0);
                    check_with(f, m, k, n, ta, tb, 0.5, 1.0);
                }
            }
        }
    }

    #[test]
    fn bf16_b_matches_reference_on_widened_b() {
        // Reference: the same bf16 values widened to f32 up front.
        for &(m, k, n) in &[(1, 1, 1), (15, 17, 33), (29, 300, 47), (70, 520, 300)] {
            for tb in [false, true] {
                let mut r = Rng::new((m * 13 + k * 5 + n) as u64);
                let mut a = vec![0f32; m * k];
                let mut bf = vec![0f32; k * n];
                r.fill_normal(&mut a, 1.0);
                r.fill_normal(&mut bf, 1.0);
                let b16: Vec<bf16> = bf.iter().map(|&x| bf16::from_f32(x)).collect();
                let bw: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
                let av = MatRef::row_major(&a, m, k);
                let (bv16, bvw) = if tb {
                    (
                        BfMatRef::row_major(&b16, n, k).t(),
                        MatRef::row_major(&bw, n, k).t(),
                    )
                } else {
                    (
                        BfMatRef::row_major(&b16, k, n),
                        MatRef::row_major(&bw, k, n),
                    )
                };
                let mut c0 = vec![0f32; m * n];
                r.fill_normal(&mut c0, 1.0);
                for (alpha, beta) in [(1.0, 0.0), (0.5, -1.0)] {
                    let mut want = c0.clone();
                    gemm_reference(alpha, av, bvw, beta, MatMut::row_major(&mut want, m, n));
                    for f in [
                        gemm_bf16b as fn(f32, MatRef, BfMatRef, f32, MatMut),
                        gemm_bf16b_serial,
                    ] {
                        let mut got = c0.clone();
                        f(alpha, av, bv16, beta, MatMut::row_major(&mut got, m, n));
                        assert_close(&got, &want, k, &format!("bf16 ({m},{k},{n}) tb={tb}"));
                    }
                }
            }
        }
        // beta == 0 overwrites NaN here too.
        let b16 = vec![bf16::from_f32(0.5); 6];
        let a = [1f32, 2.0];
        let mut c = vec![f32::NAN; 3];
        gemm_bf16b(
            1.0,
            MatRef::row_major(&a, 1, 2),
            BfMatRef::row_major(&b16, 2, 3),
            0.0,
            MatMut::row_major(&mut c, 1, 3),
        );
        assert_eq!(c, vec![1.5; 3]);
    }

    #[test]
    fn portable_bf16_packing_matches_reference() {
        // The generic bf16 packing (non-AVX-512 CPUs, and B views with no unit stride).
        let (m, k, n) = (9, 37, 21);
        let mut r = Rng::new(3);
        let mut a = vec![0f32; m * k];
        let mut bf = vec![0f32; 3 * k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut bf, 1.0);
        let b16: Vec<bf16> = bf.iter().map(|&x| bf16::from_f32(x)).collect();
        let bw: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
        let av = MatRef::row_major(&a, m, k);
        for (rs, cs) in [(n as isize, 1), (1, k as isize), (3 * n as isize, 3)] {
            let bv16 = BfMatRef {
                data: &b16,
                rows: k,
                cols: n,
                rs,
                cs,
            };
            let bvw = MatRef {
                data: &bw,
                rows: k,
                cols: n,
                rs,
                cs,
            };
            let mut want = vec![0f32; m * n];
            gemm_reference(1.0, av, bvw, 0.0, MatMut::row_major(&mut want, m, n));
            let mut got = vec![f32::NAN; m * n];
            let cv = driver::ViewMut {
                ptr: got.as_mut_ptr(),
                rs: n as isize,
                cs: 1,
            };
            let aview = driver::View {
                ptr: a.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            let bview = driver::BfView {
                ptr: b16.as_ptr() as *const u16,
                rs,
                cs,
            };
            unsafe {
                driver::gemm_blocked::<portable::Portable, _>(
                    m, n, k, 1.0, aview, bview, 0.0, cv, 1,
                )
            };
            assert_close(
                &got,
                &want,
                k,
                &format!("portable bf16 strides ({rs},{cs})"),
            );
            let mut got2 = vec![f32::NAN; m * n];
            gemm_bf16b(1.0, av, bv16, 0.0, MatMut::row_major(&mut got2, m, n));
            assert_close(&got2, &want, k, &format!("bf16 strides ({rs},{cs})"));
        }
    }

    #[test]
    fn overlapping_output_views_fall_back_to_sequential_order() {
        // rs == 0: every row of C is the same memory; the defined result is the last row's.
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|x| x as f32 * 0.25).collect();
        let b: Vec<f32> = (0..k * n).map(|x| 1.0 - x as f32 * 0.1).collect();
        let mut c1 = vec![1f32; n];
        let mut c2 = vec![1f32; n];
        let av = MatRef::row_major(&a, m, k);
        let bv = MatRef::row_major(&b, k, n);
        gemm(
            1.0,
            av,
            bv,
            1.0,
            MatMut {
                data: &mut c1,
                rows: m,
                cols: n,
                rs: 0,
                cs: 1,
            },
        );
        gemm_reference(
            1.0,
            av,
            bv,
            1.0,
            MatMut {
                data: &mut c2,
                rows: m,
                cols: n,
                rs: 0,
                cs: 1,
            },
        );
        assert_eq!(c1, c2);
    }

    /// `gemm_tiles` hands over every element of `A * B` exactly once, inside the block
    /// of the task that owns it, bit-identical to `gemm`; shapes cover one and several
    /// depth blocks, partial tiles, a transposed B (the encoder's `W^T` view) and both
    /// the serial and the threaded path.
    #[test]
    fn tiles_equal_gemm() {
        for &(m, k, n, tb) in &[
            (5, 3, 7, false),
            (37, 300, 101, true),
            (130, 600, 1100, true),
            (300, 577, 700, false),
        ] {
            let mut r = Rng::new((m * 13 + k * 5 + n) as u64);
            let mut a = vec![0f32; m * k];
            let mut b = vec![0f32; k * n];
            r.fill_normal(&mut a, 1.0);
            r.fill_normal(&mut b, 1.0);
            let av = MatRef::row_major(&a, m, k);
            let bv = if tb {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let mut want = vec![0f32; m * n];
            gemm(1.0, av, bv, 0.0, MatMut::row_major(&mut want, m, n));
            type Got = (
                std::ops::Range<usize>,
                std::ops::Range<usize>,
                Vec<(usize, usize, f32)>,
            );
            let states: Vec<Got> = gemm_tiles(
                av,
                bv,
                &|rows, cols| (rows, cols, Vec::new()),
                &|s: &mut Got, t: &Tile| {
                    for i in 0..t.rows {
                        for (j, &v) in t.row(i).iter().enumerate() {
                            s.2.push((t.row0 + i, t.col0 + j, v));
                        }
                    }
                },
            );
            let mut seen = vec![0u8; m * n];
            let mut got = vec![f32::NAN; m * n];
            for (rows, cols, vals) in &states {
                for &(i, j, v) in vals {
                    assert!(
                        rows.contains(&i) && cols.contains(&j),
                        "{m}x{k}x{n}: ({i}, {j}) outside its task"
                    );
                    seen[i * n + j] += 1;
                    got[i * n + j] = v;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "{m}x{k}x{n}: an element missing or repeated"
            );
            let same = got
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{m}x{k}x{n}: tiles differ from gemm");
        }
    }
}
