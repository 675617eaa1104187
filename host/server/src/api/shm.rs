//! Triton's system shared-memory extension: a client on the same machine registers a
//! POSIX shared-memory object (`/dev/shm/KEY`) as a named region; inputs are then read
//! from it and outputs written into it instead of travelling in the request and
//! response.
//!
//! Off unless `--allow-client-shm true`. A region is mapped when it is registered and
//! unmapped when it is unregistered and no request holds it any more; a client that
//! truncates its object gets an error for its request, not a fault of the server
//! (`mapping`).

mod mapping;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use wisp_core::error::{Error, ErrorKind, Result};

/// Regions registered at once.
pub const MAX_REGIONS: usize = 256;
const MAX_NAME_BYTES: usize = 128;
/// Where POSIX shared-memory objects live on Linux (`shm_open` opens files there).
const SHM_DIR: &str = "/dev/shm";

/// A tensor's place in a region, from its `shared_memory_*` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

struct Region {
    key: String,
    offset: u64,
    byte_size: u64,
    mapping: mapping::Mapping,
    /// Kept to notice a truncated object before copying (the mapping's guard catches
    /// a truncation during the copy).
    file: std::fs::File,
}

pub struct SystemSharedMemory {
    enabled: bool,
    regions: parking_lot::Mutex<BTreeMap<String, Arc<Region>>>,
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Unable to find system shared memory region: '{name}'"),
    )
}

impl SystemSharedMemory {
    pub fn new(enabled: bool) -> SystemSharedMemory {
        SystemSharedMemory {
            enabled,
            regions: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    fn check_enabled(&self) -> Result<()> {
        if self.enabled {
            Ok(())
        } else {
            Err(Error::invalid(
                "system shared memory is off on this server: start wisp with --allow-client-shm true",
            ))
        }
    }

    /// Registers `byte_size` bytes at `offset` of the object `key` ("/name") as `name`.
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> Result<()> {
        self.check_enabled()?;
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(format!(
                "a shared memory region's name must have 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        let object = key
            .strip_prefix('/')
            .filter(|o| !o.is_empty() && !o.contains('/') && *o != "." && *o != ".." && o.len() <= 255)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "shared memory key '{key}' must be a POSIX shared memory name: '/' and then 1 to 255 bytes without '/'"
                ))
            })?;
        if byte_size == 0 {
            return Err(Error::invalid(format!(
                "shared memory region '{name}': byte_size must be positive"
            )));
        }
        let mut regions = self.regions.lock();
        if regions.contains_key(name) {
            return Err(Error::invalid(format!(
                "shared memory region '{name}' is already registered; unregister it first"
            )));
        }
        if regions.len() >= MAX_REGIONS {
            return Err(Error::unavailable(format!(
                "{MAX_REGIONS} shared memory regions are registered, the server's limit; unregister some"
            )));
        }
        let path = std::path::Path::new(SHM_DIR).join(object);
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
        };
        // An object the server may only read still serves inputs.
        let (file, writable) = match open(true) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (open(false), false),
            other => (other, true),
        };
        let file = file.map_err(|e| {
            Error::invalid(format!(
                "cannot open shared memory '{key}' for region '{name}': {e}"
            ))
        })?;
        let metadata = file
            .metadata()
            .map_err(|e| Error::invalid(format!("cannot read shared memory '{key}': {e}")))?;
        let end = offset.checked_add(byte_size);
        if !metadata.is_file() || end.is_none_or(|end| end > metadata.len()) {
            return Err(Error::invalid(format!(
                "shared memory '{key}' has {} bytes; region '{name}' asks for {byte_size} bytes at offset {offset}",
                metadata.len()
            )));
        }
        let mapping = mapping::Mapping::new(&file, offset, byte_size, writable).map_err(|e| {
            Error::invalid(format!("shared memory '{key}' for region '{name}': {e}"))
        })?;
        regions.insert(
            name.to_string(),
            Arc::new(Region {
                key: key.to_string(),
                offset,
                byte_size,
                mapping,
                file,
            }),
        );
        tracing::debug!(
            region = name,
            key,
            offset,
            byte_size,
            "shared memory region registered"
        );
        Ok(())
    }

    /// Unregisters `name`, or every region; an unknown name is not an error (Triton's rule).
    pub fn unregister(&self, name: Option<&str>) -> Result<()> {
        self.check_enabled()?;
        let mut regions = self.regions.lock();
        match name {
            Some(name) => {
                regions.remove(name);
            }
            None => regions.clear(),
        }
        Ok(())
    }

    /// Triton's status JSON: every region, or the one named.
    pub fn status(&self, name: Option<&str>) -> Result<Value> {
        self.check_enabled()?;
        let regions = self.regions.lock();
        let row = |name: &str, r: &Region| json!({"name": name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size});
        Ok(match name {
            Some(name) => {
                let region = regions.get(name).ok_or_else(|| not_found(name))?;
                json!([row(name, region)])
            }
            None => Value::Array(regions.iter().map(|(n, r)| row(n, r)).collect()),
        })
    }

    fn locate(&self, at: &SharedRef, what: &str) -> Result<(Arc<Region>, usize)> {
        self.check_enabled()?;
        let region = self
            .regions
            .lock()
            .get(&at.region)
            .cloned()
            .ok_or_else(|| not_found(&at.region))?;
        let end = at.offset.checked_add(at.byte_size);
        if end.is_none_or(|end| end > region.byte_size) {
            return Err(Error::invalid(format!(
                "{what}: {} bytes at offset {} are outside shared memory region '{}' ({} bytes)",
                at.byte_size, at.offset, at.region, region.byte_size
            )));
        }
        let covered = region.file.metadata().map(|m| m.len());
        if covered.is_err() || covered.is_ok_and(|len| len < region.offset + region.byte_size) {
            return Err(fault_error(mapping::Fault::Truncated, what, &at.region));
        }
        // Within the region's byte_size, which the mapping covers.
        Ok((region.clone(), at.offset as usize))
    }

    /// The bytes of an input, at most `limit` of them (the server's request size limit).
    pub fn read(&self, at: &SharedRef, what: &str, limit: usize) -> Result<bytes::Bytes> {
        if at.byte_size > limit as u64 {
            return Err(Error::invalid(format!(
                "{what}: {} bytes of shared memory exceed the server's limit of {limit} bytes per request",
                at.byte_size
            )));
        }
        let (region, position) = self.locate(at, what)?;
        let data = region
            .mapping
            .read(position, at.byte_size as usize)
            .map_err(|fault| region.fault_error(fault, what, &at.region))?;
        Ok(data.into())
    }

    /// Fills the inputs at `places` (index in `inputs`, place) from their regions and
    /// checks each against its shape; each input is at most `limit` bytes.
    pub fn fill_inputs(
        &self,
        inputs: &mut [wisp_core::tensor::Tensor],
        places: Vec<(usize, SharedRef)>,
        limit: usize,
    ) -> Result<()> {
        for (index, at) in places {
            let tensor = &mut inputs[index];
            tensor.data = self.read(&at, &format!("input '{}'", tensor.name), limit)?;
            tensor.validate_size()?;
        }
        Ok(())
    }

    /// Writes an output into its place, which must hold it.
    pub fn write(&self, at: &SharedRef, what: &str, data: &[u8]) -> Result<()> {
        if data.len() as u64 > at.byte_size {
            return Err(Error::invalid(format!(
                "{what} has {} bytes, more than the {} bytes of shared memory given for it",
                data.len(),
                at.byte_size
            )));
        }
        let (region, position) = self.locate(at, what)?;
        region
            .mapping
            .write(position, data)
            .map_err(|fault| region.fault_error(fault, what, &at.region))
    }
}

impl Region {
    /// `fault_error`, and a log line the first time the mapping faulted.
    fn fault_error(&self, fault: mapping::Fault, what: &str, region: &str) -> Error {
        if self.mapping.first_report() {
            tracing::warn!(
                region,
                key = %self.key,
                "shared memory object shrank under the server's copy; zero pages replaced the mapping, the region fails until registered again"
            );
        }
        fault_error(fault, what, region)
    }
}

/// The error for a copy that failed at the region's mapping.
fn fault_error(fault: mapping::Fault, what: &str, region: &str) -> Error {
    Error::invalid(match fault {
        mapping::Fault::Truncated => format!(
            "{what}: shared memory region '{region}' no longer has all its bytes (was its object truncated?); unregister it and register it again"
        ),
        mapping::Fault::ReadOnly => format!(
            "{what}: shared memory region '{region}' is read-only to the server (its object could not be opened for writing)"
        ),
    })
}

/// The `shared_memory_region`, `shared_memory_byte_size` and `shared_memory_offset`
/// parameters of an input or output, if it names a region.
pub fn shared_ref(
    parameters: Option<&serde_json::Map<String, Value>>,
    owner: &str,
) -> Result<Option<SharedRef>> {
    let Some(parameters) = parameters else {
        return Ok(None);
    };
    let Some(region) = parameters.get("shared_memory_region") else {
        for key in ["shared_memory_byte_size", "shared_memory_offset"] {
            if parameters.contains_key(key) {
                return Err(Error::invalid(format!(
                    "{owner} has '{key}' but no 'shared_memory_region'"
                )));
            }
        }
        return Ok(None);
    };
    let region = region.as_str().filter(|r| !r.is_empty()).ok_or_else(|| {
        Error::invalid(format!(
            "parameter 'shared_memory_region' of {owner} must be a region name, got {region}"
        ))
    })?;
    let number = |key: &str| -> Result<Option<u64>> {
        parameters
            .get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    Error::invalid(format!(
                        "parameter '{key}' of {owner} must be a non-negative integer, got {v}"
                    ))
                })
            })
            .transpose()
    };
    let byte_size = number("shared_memory_byte_size")?.ok_or_else(|| {
        Error::invalid(format!(
            "{owner} names shared memory region '{region}' but no 'shared_memory_byte_size'"
        ))
    })?;
    Ok(Some(SharedRef {
        region: region.to_string(),
        offset: number("shared_memory_offset")?.unwrap_or(0),
        byte_size,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Object(String);

    impl Object {
        fn new(bytes: &[u8]) -> Object {
            let name = format!("wisp-test-{}-{}", std::process::id(), fastrand::u64(..));
            std::fs::write(std::path::Path::new(SHM_DIR).join(&name), bytes).unwrap();
            Object(name)
        }
        fn key(&self) -> String {
            format!("/{}", self.0)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(std::path::Path::new(SHM_DIR).join(&self.0));
        }
    }

    fn at(region: &str, offset: u64, byte_size: u64) -> SharedRef {
        SharedRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    #[test]
    fn regions_are_read_and_written_within_their_bounds() {
        let object = Object::new(&[7u8; 64]);
        let shm = SystemSharedMemory::new(true);
        shm.register("r", &object.key(), 16, 32).unwrap();
        shm.write(&at("r", 8, 8), "output 'Y'", &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(
            &shm.read(&at("r", 8, 8), "input 'X'", 1 << 20).unwrap()[..],
            [1, 2, 3, 4, 7, 7, 7, 7]
        );
        let status = shm.status(Some("r")).unwrap();
        assert_eq!(status[0]["key"], object.key());
        assert_eq!(status[0]["byte_size"], 32);
        let outside = shm.read(&at("r", 30, 4), "input 'X'", 1 << 20).unwrap_err();
        assert!(
            outside
                .message
                .contains("outside shared memory region 'r' (32 bytes)"),
            "{outside:?}"
        );
        let too_big = shm
            .write(&at("r", 0, 2), "output 'Y'", &[0; 3])
            .unwrap_err();
        assert!(
            too_big.message.contains("more than the 2 bytes"),
            "{too_big:?}"
        );
        let limit = shm.read(&at("r", 0, 32), "input 'X'", 16).unwrap_err();
        assert!(limit.message.contains("limit of 16 bytes"), "{limit:?}");
        shm.unregister(Some("r")).unwrap();
        assert_eq!(
            shm.read(&at("r", 0, 1), "input 'X'", 16).unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[test]
    fn a_truncated_object_fails_the_request_not_the_server() {
        let object = Object::new(&[1u8; 4096]);
        let shm = SystemSharedMemory::new(true);
        shm.register("r", &object.key(), 0, 4096).unwrap();
        std::fs::File::options()
            .write(true)
            .open(std::path::Path::new(SHM_DIR).join(&object.0))
            .unwrap()
            .set_len(10)
            .unwrap();
        let error = shm
            .read(&at("r", 0, 4096), "input 'X'", 1 << 20)
            .unwrap_err();
        assert!(
            error.message.contains("was its object truncated"),
            "{error:?}"
        );
    }

    #[test]
    fn bad_registrations_are_named() {
        let object = Object::new(&[0u8; 8]);
        let off = SystemSharedMemory::new(false);
        assert!(off
            .register("r", &object.key(), 0, 8)
            .unwrap_err()
            .message
            .contains("--allow-client-shm true"));
        let shm = SystemSharedMemory::new(true);
        for key in ["no-slash", "/a/b", "/..", "/"] {
            let e = shm.register("r", key, 0, 8).unwrap_err();
            assert!(
                e.message.contains("POSIX shared memory name"),
                "{key}: {e:?}"
            );
        }
        let e = shm.register("r", &object.key(), 4, 8).unwrap_err();
        assert!(
            e.message
                .contains("has 8 bytes; region 'r' asks for 8 bytes at offset 4"),
            "{e:?}"
        );
        let e = shm.register("r", "/wisp-no-such-object", 0, 8).unwrap_err();
        assert!(e.message.contains("cannot open shared memory"), "{e:?}");
        shm.register("r", &object.key(), 0, 8).unwrap();
        assert!(shm
            .register("r", &object.key(), 0, 8)
            .unwrap_err()
            .message
            .contains("already registered"));
        assert_eq!(
            shm.status(Some("nope")).unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[test]
    fn shared_memory_parameters_are_parsed_and_checked() {
        let params = |v: Value| v.as_object().cloned();
        assert_eq!(shared_ref(None, "input 'X'").unwrap(), None);
        assert_eq!(
            shared_ref(
                params(json!({"shared_memory_region": "r", "shared_memory_byte_size": 64}))
                    .as_ref(),
                "input 'X'"
            )
            .unwrap(),
            Some(at("r", 0, 64))
        );
        let e = shared_ref(
            params(json!({"shared_memory_region": "r"})).as_ref(),
            "input 'X'",
        )
        .unwrap_err();
        assert!(e.message.contains("no 'shared_memory_byte_size'"), "{e:?}");
        let e = shared_ref(
            params(json!({"shared_memory_offset": 4})).as_ref(),
            "output 'Y'",
        )
        .unwrap_err();
        assert!(e.message.contains("no 'shared_memory_region'"), "{e:?}");
    }
}
