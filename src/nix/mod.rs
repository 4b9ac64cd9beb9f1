//! Pure Nix domain code: no I/O. Hashes, names, narinfos, keys and signatures, compression names.

pub mod base32;
pub mod compression;
pub mod content_address;
pub mod debuginfo;
pub mod hash;
pub mod names;
pub mod narinfo;
pub mod realisation;
pub mod signing;

pub use compression::Compression;
pub use debuginfo::{DebugInfoLink, DebugInfoName, MAX_DEBUGINFO_BYTES};
pub use hash::{Sha256, StorePathHash};
pub use names::{NarFileName, OutputName, RealisationName, StorePathBaseName, TopLevelFile};
pub use narinfo::{references_first, NarInfo, NarInfoError, NarUrlError, MAX_NARINFO_BYTES};
pub use realisation::{Realisation, RealisationError};
pub use signing::{PublicKey, SecretKey, Signature};
