//! Reading a per-CPU hash map with `BPF_MAP_LOOKUP_BATCH`.

use aya::maps::{MapData, PerCpuHashMap};

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of a per-CPU hash map with its per-CPU values, read with `BPF_MAP_LOOKUP_BATCH`
/// 128 keys at a time: at a scrape of 1,000 workloads that is 8 syscalls instead of 2,000.
/// Like the key-by-key walk it is not atomic: entries updated meanwhile are read as they are.
/// `f` gets each entry's key and per-CPU values as they come: no copy of the map is kept.
pub(super) fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
    mut f: impl FnMut(K, &[V]),
) -> std::io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};

    use aya::maps::IterableMap;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let (ksz, vsz) = (std::mem::size_of::<K>(), std::mem::size_of::<V>().next_multiple_of(8));
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut count = 128usize;
    let (mut keys, mut values) = (vec![0u8; count * ksz], vec![0u8; count * cpus * vsz]);
    let mut per_cpu: Vec<V> = Vec::with_capacity(cpus);
    // The kernel's position token (4 bytes for hash maps), kept in 8 for any map type.
    let (mut token, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token as *const u64 as u64 },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `count` keys and `count` x `cpus` values of the
        // map's sizes (per-CPU values are 8-byte aligned per CPU) and at two 8-byte tokens, all
        // alive for the call; the kernel writes only within them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        let end = match err.as_ref().and_then(std::io::Error::raw_os_error) {
            None if err.is_none() => false,
            Some(libc::ENOENT) => true,
            // One hash bucket holds more keys than asked for: ask for more.
            Some(libc::ENOSPC) if count < 1 << 16 => {
                count *= 2;
                keys.resize(count * ksz, 0);
                values.resize(count * cpus * vsz, 0);
                continue;
            }
            _ => return Err(err.unwrap_or_else(|| std::io::Error::other("bpf() failed"))),
        };
        let got = (attr.count as usize).min(count);
        for i in 0..got {
            // SAFETY: `i` < `count`: the reads stay within the buffers; K and V are Pod (any
            // bytes are a valid value), read unaligned from the byte buffers.
            let k = unsafe { std::ptr::read_unaligned(keys.as_ptr().add(i * ksz) as *const K) };
            per_cpu.clear();
            per_cpu.extend(
                (0..cpus)
                    // SAFETY: as above, `(i * cpus + c) * vsz + size_of::<V>()` <= the buffer's length.
                    .map(|c| unsafe {
                        std::ptr::read_unaligned(values.as_ptr().add((i * cpus + c) * vsz) as *const V)
                    }),
            );
            f(k, &per_cpu);
        }
        if end {
            return Ok(());
        }
        token = next;
        first = false;
    }
}
