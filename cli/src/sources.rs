//! Reading manifest files for `apply -f` and `delete -f`: files, directories (recursive,
//! `*.yaml` and `*.yml` only, in sorted order) and `-` for standard input.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bramble_api::rest::Source;

use crate::output::describe_io;

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A named file or directory cannot be read.
    #[error("cannot read {}: {}", path.display(), describe_io(cause))]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// A directory holds no manifest files.
    #[error("no manifests found in {} (only *.yaml and *.yml files are read)", path.display())]
    EmptyDir {
        /// The directory.
        path: PathBuf,
    },
    /// Standard input cannot be read.
    #[error("cannot read standard input: {}", describe_io(cause))]
    Stdin {
        /// Why.
        cause: io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("cannot read {}: not UTF-8 text", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// `-` named twice.
    #[error("standard input (-) can be given only once")]
    StdinTwice,
}

/// Whether a directory entry is a manifest file by its name.
fn is_manifest_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Manifest files under `dir`, recursively, sorted by path. Hidden entries (`.git`,
/// editor files) are skipped, and symbolic links to directories are not followed, so a
/// link loop cannot trap the walk.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    walk_into(dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk_into(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| Error::Read { path, cause }
    };
    for entry in fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ty = entry.file_type().map_err(read_err(&path))?;
        if ty.is_dir() {
            walk_into(&path, out)?;
        } else if is_manifest_name(&path) && (ty.is_file() || path.is_file()) {
            out.push(path);
        }
    }
    Ok(())
}

/// The manifest files named by `-f` arguments, in order: a file as given (whatever its
/// extension), a directory expanded by [`walk`], `-` kept as is.
pub fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut stdin_seen = false;
    for a in args {
        if a.as_os_str() == "-" {
            if stdin_seen {
                return Err(Error::StdinTwice);
            }
            stdin_seen = true;
            out.push(a.clone());
            continue;
        }
        let meta = fs::metadata(a).map_err(|cause| Error::Read {
            path: a.clone(),
            cause,
        })?;
        if meta.is_dir() {
            let files = walk(a)?;
            if files.is_empty() {
                return Err(Error::EmptyDir { path: a.clone() });
            }
            out.extend(files);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// Reads every file named by `-f` arguments (see [`expand`]) as a [`Source`] named by
/// its path, so errors point at `manifests/wallet.yaml:3:5`.
pub fn read(args: &[PathBuf], stdin: &mut dyn Read) -> Result<Vec<Source>, Error> {
    expand(args)?
        .into_iter()
        .map(|p| {
            let bytes = if p.as_os_str() == "-" {
                let mut buf = Vec::new();
                stdin
                    .read_to_end(&mut buf)
                    .map_err(|cause| Error::Stdin { cause })?;
                buf
            } else {
                fs::read(&p).map_err(|cause| Error::Read {
                    path: p.clone(),
                    cause,
                })?
            };
            let content =
                String::from_utf8(bytes).map_err(|_| Error::NotText { path: p.clone() })?;
            Ok(Source {
                name: p.display().to_string(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(p, "x: 1\n").expect("write");
    }

    #[test]
    fn directories_are_walked_recursively_sorted_and_filtered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for f in [
            "b.yaml",
            "a.yml",
            "notes.txt",
            "sub/c.yaml",
            "sub/deeper/a.yaml",
            ".hidden.yaml",
            ".git/x.yaml",
            "README.md",
        ] {
            touch(&d.join(f));
        }
        let got: Vec<String> = walk(d)
            .expect("walks")
            .iter()
            .map(|p| p.strip_prefix(d).expect("under dir").display().to_string())
            .collect();
        assert_eq!(got, ["a.yml", "b.yaml", "sub/c.yaml", "sub/deeper/a.yaml"]);
    }

    #[test]
    fn files_keep_their_order_and_any_extension() {
        let dir = tempfile::tempdir().expect("temp dir");
        let z = dir.path().join("z.txt");
        let a = dir.path().join("m").join("a.yaml");
        touch(&z);
        touch(&a);
        let got = expand(&[z.clone(), dir.path().join("m"), "-".into()]).expect("expands");
        assert_eq!(got, vec![z, a, PathBuf::from("-")]);
    }

    #[test]
    fn missing_paths_and_empty_directories_are_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nope.yaml");
        let err = expand(std::slice::from_ref(&missing))
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            err,
            format!(
                "cannot read {}: no such file or directory",
                missing.display()
            )
        );
        let err = expand(&[dir.path().to_path_buf()])
            .expect_err("must fail")
            .to_string();
        assert!(err.starts_with("no manifests found in "), "{err}");
        assert!(matches!(
            expand(&["-".into(), "-".into()]),
            Err(Error::StdinTwice)
        ));
    }

    #[test]
    fn sources_are_named_by_path_and_stdin_by_dash() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("w.yaml");
        fs::write(&f, "kind: Wallet\n").expect("write");
        let mut stdin: &[u8] = b"kind: Job\n";
        let got = read(&[f.clone(), "-".into()], &mut stdin).expect("reads");
        assert_eq!(
            got,
            vec![
                Source {
                    name: f.display().to_string(),
                    content: "kind: Wallet\n".into()
                },
                Source {
                    name: "-".into(),
                    content: "kind: Job\n".into()
                },
            ]
        );
    }
}
