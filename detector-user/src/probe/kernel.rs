//! What racewatch reads of the running kernel itself: the offset of `tgid` in its
//! `struct task_struct`, from the kernel's own BTF, so the fork program can tell a new process
//! from a new thread on any kernel build.
use std::{path::Path, sync::OnceLock};

use btfparse::{Offset, Readable, TypeInformation};

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read {VMLINUX_BTF}: {0} (a kernel built without CONFIG_DEBUG_INFO_BTF)")]
    Read(std::io::Error),
    #[error("cannot parse {VMLINUX_BTF}: {0}")]
    Parse(String),
    #[error("{VMLINUX_BTF} does not describe struct task_struct's tgid")]
    NoTgid,
}

/// The kernel's BTF, as btfparse reads it.
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// The offset, once found (the kernel's BTF takes a few hundred ms to parse).
static TGID_OFFSET: OnceLock<Result<u64, String>> = OnceLock::new();

/// Starts reading the kernel's BTF in the background, so that it overlaps the reading of the
/// target's symbols and DWARF.
pub fn prefetch() {
    std::thread::spawn(task_tgid_offset);
}

/// The byte offset of `tgid` in `struct task_struct`, or why it is unknown.
pub fn task_tgid_offset() -> Result<u64, String> {
    TGID_OFFSET
        .get_or_init(|| tgid_offset_in(Path::new(VMLINUX_BTF)).map_err(|e| e.to_string()))
        .clone()
}

fn tgid_offset_in(path: &Path) -> Result<u64, KernelError> {
    let data = Bytes(std::fs::read(path).map_err(KernelError::Read)?);
    let types = TypeInformation::new(&data).map_err(|e| KernelError::Parse(format!("{e:?}")))?;
    let task = types.id_of("task_struct").ok_or(KernelError::NoTgid)?;
    match types.offset_of(task, "tgid") {
        Ok((_, Offset::ByteOffset(off))) if off > 0 => Ok(u64::from(off)),
        _ => Err(KernelError::NoTgid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_describes_the_tgid_of_a_task() {
        // Every kernel racewatch supports carries BTF (FACTS: this machine's does); the offset
        // lies well inside the struct, after its scheduling state.
        let off = task_tgid_offset().expect("BTF");
        assert!((64..16_384).contains(&off), "{off}");
    }

    #[test]
    fn a_missing_file_says_which() {
        let e = tgid_offset_in(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read /sys/kernel/btf/vmlinux"),
            "{e}"
        );
    }
}
