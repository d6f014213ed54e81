//! Maildir delivery (tmp/ then rename into new/), safe for concurrent writers.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
};

pub struct Maildir {
    root: PathBuf,
}

impl Maildir {
    pub fn create(root: &Path) -> io::Result<Maildir> {
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(root.join(sub))?;
        }
        Ok(Maildir {
            root: root.to_path_buf(),
        })
    }

    /// Writes one message and returns its file name in `new/`.
    pub fn deliver(&self, message: &[u8]) -> io::Result<String> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("{secs}.{}.herald-sink", ulid::Ulid::new());
        let tmp = self.root.join("tmp").join(&name);
        let mut f = fs::File::create(&tmp)?;
        f.write_all(message)?;
        f.sync_all()?;
        fs::rename(&tmp, self.root.join("new").join(&name))?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_messages_land_in_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let md = Maildir::create(dir.path()).expect("create");
        let name = md.deliver(b"Subject: x\r\n\r\nhi\r\n").expect("deliver");
        let stored = fs::read(dir.path().join("new").join(name)).expect("read");
        assert_eq!(stored, b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }
}
