//! The robust aggregators' round buffer on disk: `STATE_DIR/spool/robust/RUN/NODE.f32`, one file
//! per admitted update of the open round (little-endian f32, the model's length), read back a
//! coordinate block at a time when the round closes (`strategy::robust`), so the coordinator holds
//! O(nodes × model) on disk and O(nodes × block + model) in memory.
//!
//! The files are removed when the round closes or fails and when the run ends; nothing of them is
//! worth keeping across a restart (a resumed run runs the interrupted round again from its start,
//! and nodes send the same bytes again), so [`FileRoundBuffers::open`] removes the directory at
//! start. They are not fsync'd for the same reason. Run ids and node names are hashed into file
//! names, never used as paths.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;

use crate::strategy::robust::{RoundBuffer, RoundBuffers};

/// Opens one [`FileRoundBuffer`] per robust run under `root` (`spool/robust`).
#[derive(Debug, Clone)]
pub struct FileRoundBuffers {
    root: PathBuf,
}

impl FileRoundBuffers {
    /// Removes what an earlier process left under `root` (its rounds did not close) and creates
    /// it afresh.
    pub fn open(root: &Path) -> io::Result<Self> {
        match fs::remove_dir_all(root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(root)?;
        Ok(Self { root: root.to_path_buf() })
    }
}

impl RoundBuffers for FileRoundBuffers {
    fn open(&self, run: &str) -> Box<dyn RoundBuffer> {
        Box::new(FileRoundBuffer { dir: self.root.join(hashed(run)), files: Vec::new() })
    }
}

/// One run's open round's updates, a file each. The directory is created at the first `put`.
#[derive(Debug)]
pub struct FileRoundBuffer {
    dir: PathBuf,
    /// The kept updates' files, by slot, open for reading back.
    files: Vec<(PathBuf, File)>,
}

fn hashed(text: &str) -> String {
    ContentHash::of(text.as_bytes()).to_hex()[..16].to_string()
}

impl RoundBuffer for FileRoundBuffer {
    fn put(&mut self, node: &str, values: &[f32]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        // The slot is in the name too: a node is admitted once a round, but a name must never
        // collide with a file still open in this round.
        let path = self.dir.join(format!("{}-{}.f32", self.files.len(), hashed(node)));
        let written = (|| {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
            let mut out = BufWriter::with_capacity(1 << 16, &file);
            for v in values {
                out.write_all(&v.to_le_bytes())?;
            }
            out.flush()?;
            drop(out);
            Ok::<_, io::Error>(file)
        })();
        match written {
            Ok(file) => {
                self.files.push((path, file));
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn count(&self) -> usize {
        self.files.len()
    }

    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()> {
        let (_, file) = self
            .files
            .get(slot)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no buffered update in slot {slot}")))?;
        let mut reader = file;
        reader.seek(SeekFrom::Start(start as u64 * 4))?;
        let mut bytes = vec![0u8; out.len() * 4];
        reader.read_exact(&mut bytes)?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    fn clear(&mut self) -> io::Result<()> {
        let mut first_error = None;
        for (path, file) in self.files.drain(..) {
            drop(file);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                first_error.get_or_insert(e);
            }
        }
        match fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for FileRoundBuffer {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_round_trip_by_block_and_clear_and_restart_remove_the_files() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("spool").join("robust");
        let buffers = FileRoundBuffers::open(&root)?;
        let mut b = buffers.open("run-1");
        let a: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        b.put("cleveland", &a)?;
        b.put("va", &[-1.0; 10])?;
        assert_eq!(b.count(), 2);
        let mut out = [0.0f32; 3];
        b.read_block(0, 7, &mut out)?;
        assert_eq!(out, [3.5, 4.0, 4.5]);
        b.read_block(1, 0, &mut out)?;
        assert_eq!(out, [-1.0; 3]);
        assert!(b.read_block(0, 9, &mut out).is_err(), "past the end is an error");
        assert!(b.read_block(2, 0, &mut out).is_err(), "no such slot");
        let files = |p: &Path| fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
        assert_eq!(files(&root), 1, "one directory per run");
        assert_eq!(files(&root.join(hashed("run-1"))), 2, "one file per update");
        b.clear()?;
        assert_eq!(b.count(), 0);
        assert_eq!(files(&root), 0, "the round's files and the run's directory are gone");
        // A restart removes what a round that never closed left behind.
        b.put("va", &a)?;
        std::mem::forget(b);
        assert_eq!(files(&root), 1);
        let _ = FileRoundBuffers::open(&root)?;
        assert_eq!(files(&root), 0);
        Ok(())
    }

    #[test]
    fn a_write_that_fails_is_an_error_and_leaves_no_slot() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        // The run's directory cannot be created: a file stands where it would go.
        let root = dir.path().join("robust");
        let buffers = FileRoundBuffers::open(&root)?;
        fs::write(root.join(hashed("r")), b"not a directory")?;
        let mut b = buffers.open("r");
        assert!(b.put("va", &[1.0; 4]).is_err());
        assert_eq!(b.count(), 0);
        Ok(())
    }
}
