//! [`PassRows`]: the row-major copy of a weight that [`super::svd_top`]'s Krylov steps
//! stream, in memory the kernel is asked to back with huge pages.

use std::marker::PhantomData;

use tract_core::ndarray::ArrayView2;

use super::Stored;

/// A row-major matrix in anonymous memory advised for transparent huge pages (Linux),
/// or on the heap where that mapping fails. Each Krylov step streams the whole weight;
/// on 4 KiB pages every page of every pass misses the TLB and restarts the hardware
/// prefetchers' streams (two such streams at once, as the graft runs them, in a C
/// microbenchmark: 1.4–1.9× faster on huge pages at 16 MiB a weight, 1.0–1.5× at 32
/// MiB; in the whole graft, with the pass prefetching, a few percent).
pub(super) struct PassRows<T> {
    memory: Memory<T>,
    dim: (usize, usize),
}

/// Where [`PassRows`] keeps its elements.
enum Memory<T> {
    /// An anonymous mapping (zero-filled, page-aligned) of `len` elements.
    Mapped(memmap2::MmapMut, PhantomData<T>),
    /// The fallback.
    Heap(Vec<T>),
}

impl<T: Stored> PassRows<T> {
    /// A `[rows, cols]` matrix whose elements (row-major, zeroed) `fill` writes.
    pub(super) fn new((rows, cols): (usize, usize), fill: impl FnOnce(&mut [T])) -> Self {
        let len = rows * cols;
        let bytes = len * std::mem::size_of::<T>();
        let memory = match memmap2::MmapMut::map_anon(bytes.max(1)) {
            Ok(map) => {
                #[cfg(target_os = "linux")]
                // Only a hint: without transparent huge pages the passes still run.
                let _ = map.advise(memmap2::Advice::HugePage);
                Memory::Mapped(map, PhantomData)
            }
            Err(_) => Memory::Heap(vec![T::default(); len]),
        };
        let mut rows_out = PassRows {
            memory,
            dim: (rows, cols),
        };
        fill(rows_out.elements_mut());
        rows_out
    }

    /// The elements, row-major.
    fn elements_mut(&mut self) -> &mut [T] {
        let len = self.dim.0 * self.dim.1;
        match &mut self.memory {
            // SAFETY: the mapping holds at least len·size_of::<T>() bytes, page-aligned
            // (so aligned for T, f32 or f64), zero-filled (0.0 in either), and
            // borrowed mutably for the slice's lifetime.
            Memory::Mapped(map, _) => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<T>(), len)
            },
            Memory::Heap(elements) => elements,
        }
    }

    /// The matrix.
    pub(super) fn view(&self) -> ArrayView2<'_, T> {
        let len = self.dim.0 * self.dim.1;
        let elements: &[T] = match &self.memory {
            // SAFETY: as in elements_mut, borrowed shared.
            Memory::Mapped(map, _) => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<T>(), len)
            },
            Memory::Heap(elements) => elements,
        };
        ArrayView2::from_shape(self.dim, elements).expect("rows·cols elements")
    }
}
