//! The realisation of a content-addressed derivation's output: the JSON Nix uploads for it
//! (`realisations/<drvhash>!<output>.doi`, `build-trace/<drv>/<output>`). Every form Nix has
//! written has `outPath` (the store path's last component, `<hash>-<name>`) and
//! `signatures`; older ones also `id` and `dependentRealisations`, which are kept as sent.

use serde_json::{Map, Value};

use super::{PublicKey, SecretKey, Signature, StorePathBaseName, StorePathHash};

/// A realisation as uploaded: its JSON object and the path it names.
#[derive(Debug, Clone)]
pub struct Realisation {
    doc: Map<String, Value>,
    out: StorePathBaseName,
}

/// Why an upload is not a realisation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealisationError {
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no outPath")]
    NoOutPath,
    #[error("outPath {0:?} is not a store path")]
    BadOutPath(String),
    #[error("signatures is not a list")]
    BadSignatures,
}

impl Realisation {
    /// Parses an uploaded realisation. `outPath` may be a whole store path (`/nix/store/…`)
    /// or, as Nix writes it, its last component.
    pub fn parse(raw: &[u8]) -> Result<Self, RealisationError> {
        let Ok(Value::Object(doc)) = serde_json::from_slice(raw) else {
            return Err(RealisationError::NotAnObject);
        };
        let out = match doc.get("outPath") {
            Some(Value::String(p)) => {
                let base = p.rsplit('/').next().unwrap_or(p);
                base.parse()
                    .map_err(|_| RealisationError::BadOutPath(p.clone()))?
            }
            _ => return Err(RealisationError::NoOutPath),
        };
        if !matches!(doc.get("signatures"), None | Some(Value::Array(_))) {
            return Err(RealisationError::BadSignatures);
        }
        Ok(Self { doc, out })
    }

    /// Its `id` (`sha256:<hash>!<output>`), in the forms that have one.
    pub fn id(&self) -> Option<&str> {
        self.doc.get("id").and_then(Value::as_str)
    }

    /// The output path it names.
    pub fn out_path(&self) -> &StorePathBaseName {
        &self.out
    }

    /// Its `outPath` as written: a base name (as Nix writes it), or a whole path.
    pub fn out_path_as_written(&self) -> &str {
        self.doc
            .get("outPath")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn out_hash(&self) -> StorePathHash {
        self.out.hash()
    }

    fn signatures(&self) -> &[Value] {
        match self.doc.get("signatures") {
            Some(Value::Array(s)) => s,
            _ => &[],
        }
    }

    /// What Nix signs, for the form Nix 2.8 writes (with `id`, signatures as strings): the
    /// realisation as Nix writes it back after reading it (`id`, `outPath` and
    /// `dependentRealisations`, `{}` when absent; any other field is not read), its keys
    /// sorted, written compactly (nlohmann's `dump()`). `None` for the forms newer Nix writes,
    /// whose signatures cellar cannot check.
    pub fn fingerprint(&self) -> Option<String> {
        let id = self.doc.get("id").filter(|v| v.is_string())?;
        if !self.signatures().iter().all(Value::is_string) {
            return None;
        }
        let mut doc = Map::new();
        doc.insert("id".into(), id.clone());
        doc.insert("outPath".into(), self.doc.get("outPath")?.clone());
        doc.insert(
            "dependentRealisations".into(),
            self.doc
                .get("dependentRealisations")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new())),
        );
        serde_json::to_string(&sorted(&Value::Object(doc))).ok()
    }

    /// This realisation as served: signed by every one of `keys` (a signature of the same key
    /// name replaced), after the ones it has (unless `keep_existing` is false: then only
    /// `keys`'), as narinfos are signed when served, so that a client trusting the server's
    /// key alone can register it (Nix 2.8's `nix copy --from` checks realisations'
    /// signatures). As JSON; `None` for a form whose signatures cellar cannot make
    /// ([`Realisation::fingerprint`]): served as it is.
    pub fn signed_with(&self, keys: &[SecretKey], keep_existing: bool) -> Option<Vec<u8>> {
        let fp = self.fingerprint()?;
        let mut sigs: Vec<Value> = if keep_existing {
            self.signatures()
                .iter()
                .filter(|v| {
                    v.as_str()
                        .and_then(|s| s.parse::<Signature>().ok())
                        .is_none_or(|s| keys.iter().all(|k| k.name() != s.key_name()))
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        sigs.extend(
            keys.iter()
                .map(|k| Value::String(k.sign(fp.as_bytes()).to_string())),
        );
        let mut doc = self.doc.clone();
        doc.insert("signatures".into(), Value::Array(sigs));
        serde_json::to_vec(&doc).ok()
    }

    /// Whether one of its signatures is a valid one by one of `keys` (never, for a form whose
    /// signatures cellar cannot check: see [`Realisation::fingerprint`]).
    pub fn is_signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let Some(fp) = self.fingerprint() else {
            return false;
        };
        self.signatures()
            .iter()
            .filter_map(|s| s.as_str()?.parse::<Signature>().ok())
            .any(|s| keys.iter().any(|k| k.verifies(fp.as_bytes(), &s)))
    }

    /// This realisation with only the signatures that are signatures (`name:base64` of 64
    /// bytes), not under one of the names in `own` (the server's keys, which sign it afresh
    /// each time it is served) and, if `trusted` is not empty, valid ones by one of those
    /// keys, as narinfos' are kept; `None` if it keeps them all, or is in a form whose
    /// signatures cellar cannot check ([`Realisation::fingerprint`]).
    pub fn with_signatures_checked(&self, trusted: &[PublicKey], own: &[String]) -> Option<Self> {
        let fp = self.fingerprint()?;
        let sigs = self.signatures();
        let kept: Vec<Value> = sigs
            .iter()
            .filter(|v| {
                v.as_str()
                    .and_then(|s| s.parse::<Signature>().ok())
                    .is_some_and(|s| {
                        !own.iter().any(|n| n == s.key_name())
                            && (trusted.is_empty()
                                || trusted.iter().any(|k| k.verifies(fp.as_bytes(), &s)))
                    })
            })
            .cloned()
            .collect();
        if kept.len() == sigs.len() {
            return None;
        }
        let mut doc = self.doc.clone();
        doc.insert("signatures".into(), Value::Array(kept));
        Some(Self {
            doc,
            out: self.out.clone(),
        })
    }

    /// As JSON, to be stored.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.doc)
    }

    /// This realisation with the signatures of `other` (of the same output) it lacks added,
    /// as JSON; `None` if it has them all already, or `other` is not the same realisation as
    /// Nix signs it (its fingerprint: another `dependentRealisations`, say), whose signatures
    /// would not verify on this one.
    pub fn with_signatures_of(&self, other: &Self) -> Option<Vec<u8>> {
        if self.fingerprint() != other.fingerprint() {
            return None;
        }
        let mine = self.signatures();
        let new: Vec<Value> = other
            .signatures()
            .iter()
            .filter(|s| !mine.contains(s))
            .cloned()
            .collect();
        if new.is_empty() {
            return None;
        }
        let mut doc = self.doc.clone();
        let mut all = mine.to_vec();
        all.extend(new);
        doc.insert("signatures".into(), Value::Array(all));
        serde_json::to_vec(&doc).ok()
    }
}

/// `v` with every object's keys in sorted order, whatever order the map type keeps.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const OUT: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";

    fn doc(out: &str, sigs: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "dependentRealisations": {},
            "id": "sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!out",
            "outPath": out,
            "signatures": sigs,
        }))
        .unwrap()
    }

    #[test]
    fn names_its_output_as_nix_or_as_a_whole_path() {
        let r = Realisation::parse(&doc(OUT, &[])).unwrap();
        assert_eq!(r.out_path().as_str(), OUT);
        assert_eq!(r.out_hash().as_str(), &OUT[..32]);
        let whole = Realisation::parse(&doc(&format!("/nix/store/{OUT}"), &[])).unwrap();
        assert_eq!(whole.out_path().as_str(), OUT);
        // The newest form: only outPath and signatures (as objects).
        let new = br#"{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","signatures":[{"keyName":"k","sig":"s"}]}"#;
        assert_eq!(Realisation::parse(new).unwrap().out_path().as_str(), OUT);
    }

    #[test]
    fn what_is_not_a_realisation_is_refused() {
        for (raw, want) in [
            (&b"[]"[..], RealisationError::NotAnObject),
            (b"not json", RealisationError::NotAnObject),
            (b"{}", RealisationError::NoOutPath),
            (br#"{"outPath":7}"#, RealisationError::NoOutPath),
            (
                br#"{"outPath":"nothash-foo"}"#,
                RealisationError::BadOutPath("nothash-foo".into()),
            ),
            (
                br#"{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","signatures":"x"}"#,
                RealisationError::BadSignatures,
            ),
        ] {
            assert_eq!(Realisation::parse(raw).unwrap_err(), want, "{raw:?}");
        }
    }

    /// Written and signed by Nix 2.8 (`nix-build` with `secret-key-files`, then `nix copy`):
    /// the top output of tests/fixtures/ca.nix, with a dependent realisation.
    pub(crate) const SIGNED_BY_NIX: &str =
        include_str!("../../tests/fixtures/realisation/signed-by-nix-2.8.doi");
    /// The key it was signed with.
    pub(crate) const NIX_KEY: &str = "k1:sIy6Q2pft7QJnTyECyGbSwqf7XlG7Mx0hFlRDjc+NBo=";

    /// Nix's signature checks out against the fingerprint, however the keys were ordered as
    /// sent; a change to any field, another key, or a form whose signatures cellar cannot
    /// check, does not.
    #[test]
    fn nix_signatures_are_checked_against_the_fingerprint() {
        let key: PublicKey = NIX_KEY.parse().unwrap();
        let other = crate::nix::SecretKey::generate("k1").unwrap().public();
        let r = Realisation::parse(SIGNED_BY_NIX.as_bytes()).unwrap();
        assert!(r.is_signed_by_any(std::slice::from_ref(&key)));
        assert!(!r.is_signed_by_any(&[other]));
        // Keys reordered and spaced: the same realisation.
        let doc: serde_json::Value = serde_json::from_str(SIGNED_BY_NIX).unwrap();
        let reordered = format!(
            "{{ \"signatures\": {}, \"outPath\": {}, \"id\": {}, \"dependentRealisations\": {} }}",
            doc["signatures"], doc["outPath"], doc["id"], doc["dependentRealisations"]
        );
        let r = Realisation::parse(reordered.as_bytes()).unwrap();
        assert!(r.is_signed_by_any(std::slice::from_ref(&key)));
        for (from, to) in [
            (
                "a4zbls512viq6cfmz5qh3qpr79yy9y11-ca-top",
                "a4zbls512viq6cfmz5qh3qpr79yy9y11-ca-tip",
            ),
            (
                "yvgxqddrjimh1s7alyhbq0dh2bql9bhy-ca-leaf",
                "yvgxqddrjimh1s7alyhbq0dh2bql9bhy-ca-lea",
            ),
            (
                "c3ea589f67c31e5319f1ed424e37a1d28a25ea64ac904!out",
                "c3ea589f67c31e5319f1ed424e37a1d28a25ea64ac904!dev",
            ),
        ] {
            let changed = SIGNED_BY_NIX.replace(from, to);
            let r = Realisation::parse(changed.as_bytes()).unwrap();
            assert!(!r.is_signed_by_any(std::slice::from_ref(&key)), "{to}");
        }
        // Newer forms: signatures as objects, no id.
        let new = format!(
            r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"k1","sig":"fvz+6VX1K+AHsC6VQcX6ipfNlOgtjj8KZVS/AbKlIa1Wb6GVSEfpOwrJeIdBtIZ5fgvOsybLnnqMH5M6xtVzCg=="}}]}}"#
        );
        let r = Realisation::parse(new.as_bytes()).unwrap();
        assert!(r.fingerprint().is_none());
        assert!(!r.is_signed_by_any(&[key]));
    }

    /// Served, a realisation carries the server's signatures, which Nix's check (the key
    /// and the fingerprint it computes) accepts; the ones it had stay, but not another by a
    /// server key's name; without `keep_existing`, only the server's. A form newer Nix writes
    /// is served as it is.
    #[test]
    fn served_realisations_are_signed_by_the_servers_keys() {
        let server = crate::nix::SecretKey::generate("cache-1").unwrap();
        let nix_key: PublicKey = NIX_KEY.parse().unwrap();
        let stale = crate::nix::SecretKey::generate("cache-1")
            .unwrap()
            .sign(b"an older key of that name");
        let mut doc: serde_json::Value = serde_json::from_str(SIGNED_BY_NIX).unwrap();
        doc["signatures"]
            .as_array_mut()
            .unwrap()
            .push(stale.to_string().into());
        let r = Realisation::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let served =
            Realisation::parse(&r.signed_with(std::slice::from_ref(&server), true).unwrap())
                .unwrap();
        assert!(served.is_signed_by_any(&[server.public()]));
        assert!(served.is_signed_by_any(std::slice::from_ref(&nix_key)));
        let names: Vec<&str> = served
            .signatures()
            .iter()
            .map(|s| s.as_str().unwrap().split(':').next().unwrap())
            .collect();
        assert_eq!(names, ["k1", "cache-1"]);
        assert_eq!(served.doc.get("id"), r.doc.get("id"));
        assert_eq!(served.out_path(), r.out_path());
        let only_ours =
            Realisation::parse(&r.signed_with(std::slice::from_ref(&server), false).unwrap())
                .unwrap();
        assert_eq!(only_ours.signatures().len(), 1);
        assert!(only_ours.is_signed_by_any(&[server.public()]));
        let new = format!(r#"{{"outPath":"{OUT}","signatures":[]}}"#);
        assert!(Realisation::parse(new.as_bytes())
            .unwrap()
            .signed_with(&[server], true)
            .is_none());
    }

    /// What Nix signs is what it reads: a field it does not read changes nothing, and
    /// `dependentRealisations` left out is the empty one it writes back.
    #[test]
    fn the_fingerprint_is_of_the_fields_nix_reads() {
        let key: PublicKey = NIX_KEY.parse().unwrap();
        let mut added: serde_json::Value = serde_json::from_str(SIGNED_BY_NIX).unwrap();
        added["comment"] = "added on the way".into();
        let r = Realisation::parse(&serde_json::to_vec(&added).unwrap()).unwrap();
        assert!(r.is_signed_by_any(std::slice::from_ref(&key)));
        let bare = Realisation::parse(&doc(OUT, &[])).unwrap();
        let mut without = bare.doc.clone();
        without.remove("dependentRealisations");
        let without = Realisation {
            doc: without,
            out: bare.out.clone(),
        };
        assert_eq!(without.fingerprint(), bare.fingerprint());
        assert_eq!(
            bare.fingerprint().unwrap(),
            format!(
                r#"{{"dependentRealisations":{{}},"id":"sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!out","outPath":"{OUT}"}}"#
            )
        );
    }

    #[test]
    fn signatures_are_added_once() {
        let stored = Realisation::parse(&doc(OUT, &["a:1", "b:2"])).unwrap();
        let same = Realisation::parse(&doc(OUT, &["b:2"])).unwrap();
        assert!(stored.with_signatures_of(&same).is_none());
        let more = Realisation::parse(&doc(OUT, &["c:3", "a:1"])).unwrap();
        let merged = Realisation::parse(&stored.with_signatures_of(&more).unwrap()).unwrap();
        assert_eq!(merged.signatures(), ["a:1", "b:2", "c:3"]);
        // The rest is the stored one's.
        assert_eq!(merged.doc.get("id"), stored.doc.get("id"));
        assert_eq!(merged.out_path(), stored.out_path());
    }
}
