//! The fast path: narinfos rendered and signed once and kept in memory, NARs kept on local
//! disk, and single-flight loading so N concurrent misses cost one store request.

pub mod checked;
pub mod missing_nars;
pub mod nar;
pub mod nar_memory;
pub mod narinfo;
