//! `/proc/PID/maps`, parsed: which file is mapped where, to unwind and symbolize addresses.
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// The mapped file; `None` for anonymous memory and pseudo-mappings (`[stack]`, `[vdso]`).
    pub path: Option<PathBuf>,
}

/// Parses one line (`start-end perms offset dev inode [path]`); `None` if malformed.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
    let (_dev, inode) = (fields.next()?, fields.next()?);
    let path = fields.next().map(str::trim_start).unwrap_or("");
    let (start, end) = range.split_once('-')?;
    let path = (inode != "0" && path.starts_with('/') && !path.ends_with(" (deleted)"))
        .then(|| PathBuf::from(path));
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        path,
    })
}

pub fn parse(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

/// The mapping that holds `addr`.
pub fn find(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    maps.iter().find(|m| (m.start..m.end).contains(&addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 08:01 1234                       /tmp/cache_demo
55d0c8a02000-55d0c8a05000 r-xp 00002000 08:01 1234                       /tmp/cache_demo
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d400000-7f1e2d428000 r--p 00000000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2d428000-7f1e2d5bd000 r-xp 00028000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2d600000-7f1e2d601000 r-xp 00000000 08:01 77                         /tmp/old lib.so (deleted)
7ffc1a2b0000-7ffc1a2d1000 rw-p 00000000 00:00 0                          [stack]
7ffc1a3e4000-7ffc1a3e6000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn files_and_their_executable_mappings() {
        let maps = parse(MAPS);
        assert_eq!(maps.len(), 8);
        assert_eq!(
            maps[1],
            Mapping {
                start: 0x55d0c8a02000,
                end: 0x55d0c8a05000,
                executable: true,
                offset: 0x2000,
                path: Some("/tmp/cache_demo".into()),
            }
        );
        assert!(!maps[0].executable);
        assert_eq!(maps[2].path, None, "anonymous");
        assert_eq!(maps[5].path, None, "a deleted file cannot be read back");
        assert_eq!(maps[6].path, None, "[stack]");
        assert_eq!(maps[7].path, None, "[vdso]");
        assert!(maps[7].executable);
    }

    #[test]
    fn paths_with_spaces_and_lookup() {
        let maps = parse("1000-2000 r-xp 00000000 08:01 5     /opt/my app/bin\n");
        assert_eq!(maps[0].path, Some("/opt/my app/bin".into()));
        assert_eq!(find(&maps, 0x1fff).map(|m| m.start), Some(0x1000));
        assert!(find(&maps, 0x2000).is_none());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse("garbage\nzz-10 r-xp 0 0 0\n").is_empty());
    }
}
