//! The buffer an S3 upload part is filled in: an anonymous mapping of [`PART_SIZE`] bytes,
//! of which only the pages written take memory, given back to the system as soon as the part
//! is sent (the [`Bytes`] made of it dropped).
//!
//! From the heap, an 8 MiB buffer freed stays with the allocator: glibc raises its mmap
//! threshold past the first one it unmaps, and later ones come from its arenas, which keep
//! them. A server that had received large NARs then held about 130 MiB more at rest, all of it
//! freed part buffers (a soak walk: 165 MB RSS at rest, 4 MB of it in use; the same run with
//! `MALLOC_MMAP_THRESHOLD_` set stayed near its 50 MB start).

use bytes::Bytes;
use memmap2::MmapMut;

use super::PART_SIZE;

/// A part being filled (see the module doc). Mapped on its first write.
#[derive(Default)]
pub(super) struct PartBuf {
    map: Option<MmapMut>,
    len: usize,
}

impl PartBuf {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends `data`, which must fit: at most [`PART_SIZE`] in all.
    pub(super) fn extend(&mut self, data: &[u8]) -> std::io::Result<()> {
        let end = self.len + data.len();
        if end > PART_SIZE {
            return Err(std::io::Error::other("a part larger than PART_SIZE"));
        }
        let map = match &mut self.map {
            Some(map) => map,
            None => self.map.insert(MmapMut::map_anon(PART_SIZE)?),
        };
        map[self.len..end].copy_from_slice(data);
        self.len = end;
        Ok(())
    }

    /// What was written, as one [`Bytes`] that unmaps the buffer when dropped.
    pub(super) fn freeze(self) -> Bytes {
        match self.map {
            Some(map) => Bytes::from_owner(Filled { map, len: self.len }),
            None => Bytes::new(),
        }
    }
}

/// A filled part's mapping and how much of it was written.
struct Filled {
    map: MmapMut,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_holds_what_was_written_up_to_its_size() {
        assert!(PartBuf::default().freeze().is_empty());
        let mut p = PartBuf::default();
        p.extend(b"abc").unwrap();
        p.extend(&[7u8; 5]).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(&p.freeze()[..], b"abc\x07\x07\x07\x07\x07");
        let mut full = PartBuf::default();
        full.extend(&vec![1u8; PART_SIZE - 1]).unwrap();
        full.extend(&[2]).unwrap();
        assert!(full.extend(&[3]).is_err());
        let part = full.freeze();
        assert_eq!(part.len(), PART_SIZE);
        assert_eq!(part[PART_SIZE - 1], 2);
    }
}
