//! Giving freed heap memory back to the operating system after a burst.
//!
//! glibc's allocator keeps what was freed in its arenas for reuse, and large blocks
//! freed among small ones cannot shrink an arena from its top, so a burst of large
//! short-lived allocations (a big job's status sent to hundreds of watchers at once:
//! each stream holds its own encoded copy until its client reads it) leaves the
//! replica's resident size at the burst's peak long after it. [`trim`] asks the
//! allocator to return every free page (`malloc_trim(0)`); with other C libraries it
//! does nothing. It walks every arena and locks each while it does, so callers run it
//! on a blocking thread, after a burst, not after every free.
//!
//! Architecture invariant: the only foreign call of the server, taking no pointer.

/// Returns the allocator's free pages to the operating system; `false` where the C
/// library cannot (or released nothing).
pub fn trim() -> bool {
    imp::trim()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    extern "C" {
        /// glibc: releases free memory at the top of the main arena and, since 2.8,
        /// every whole free page inside any arena. Returns 1 if memory was released.
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }

    pub fn trim() -> bool {
        // SAFETY: malloc_trim takes no pointer, only a byte count to keep, and is
        // thread-safe (it takes each arena's lock); it cannot touch Rust-owned memory
        // other than by releasing pages the allocator holds free.
        unsafe { malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn trim() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn free_pages_among_live_blocks_are_released() {
        // Blocks below the mmap threshold, so they live in an arena, interleaved with
        // small live ones, so the arena cannot simply shrink from its top.
        let mut live = Vec::new();
        let mut burst = Vec::new();
        for i in 0..1024u32 {
            burst.push(vec![i as u8; 64 * 1024]);
            live.push(vec![i as u8; 64]);
        }
        drop(burst);
        assert!(super::trim(), "64 MiB of free pages were there to release");
        assert!(live
            .iter()
            .zip(0u32..)
            .all(|(v, i)| v.iter().all(|b| *b == i as u8)));
    }
}
