//! Paths a model folder names (a component file, a checkpoint folder) resolved
//! inside that folder only.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// `relative` inside `base`: refused when it is absolute, climbs out with `..`,
/// or leads out through a symbolic link. `key` names the setting in errors.
pub fn confined(base: &Path, relative: &str, key: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    let escapes = path.components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::RootDir | Component::Prefix(_)
        )
    });
    if escapes {
        return Err(Error::invalid(format!(
            "'{key}' is '{relative}': it must be a path inside the version folder {}",
            base.display()
        )));
    }
    let joined = base.join(path);
    // A link inside the folder may still point out of it.
    if let (Ok(real), Ok(real_base)) = (joined.canonicalize(), base.canonicalize()) {
        if !real.starts_with(&real_base) {
            return Err(Error::invalid(format!(
                "'{key}' is '{relative}', which leads to {} outside the version folder {}",
                real.display(),
                base.display()
            )));
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_folder() {
        let dir = std::env::temp_dir().join(format!("wisp-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        assert_eq!(
            confined(&dir, "sub", "checkpoint").unwrap(),
            dir.join("sub")
        );
        assert_eq!(confined(&dir, ".", "checkpoint").unwrap(), dir.join("."));
        for bad in ["../x", "/etc/passwd", "sub/../../x"] {
            let e = confined(&dir, bad, "sandbox.component").unwrap_err();
            assert!(e.message.contains("'sandbox.component'"), "{e:?}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", dir.join("out")).unwrap();
            let e = confined(&dir, "out", "checkpoint").unwrap_err();
            assert!(e.message.contains("outside the version folder"), "{e:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
