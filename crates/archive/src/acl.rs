//! POSIX ACLs and file capabilities, converted between the forms tar and
//! the kernel use, with id mapping.
//!
//! * Kernel form: the xattrs `system.posix_acl_access` /
//!   `system.posix_acl_default`: `u32 version = 2`, then entries
//!   `{u16 tag, u16 perm, u32 id}`, all little-endian, ordered
//!   USER_OBJ, USER…, GROUP_OBJ, GROUP…, MASK, OTHER.
//! * Tar form: GNU tar's `SCHILY.acl.access` / `SCHILY.acl.default` PAX
//!   records, libacl's long text form with numeric ids (`--numeric-owner`),
//!   one entry per line: `user::rw-\nuser:1234:rw-\ngroup::r--\nmask::rw-\nother::r--\n`.
//!   We also read the short forms libacl accepts (`u:1234:rw`, `,`
//!   separators, `#effective:` comments).
//! * File capabilities (`security.capability`): `vfs_cap_data` revisions
//!   2 (20 bytes) and 3 (24 bytes, with the namespace root uid). Mapping
//!   follows what the kernel does for a tar running in the container's user
//!   namespace: reading turns a v3 cap whose root maps to 0 into v2, writing
//!   turns v2 into v3 with the namespace root.

use crate::error::{ArchiveError, Result};
use crate::idmap::{Direction, IdKind, IdMap};

/// Name of the access ACL xattr.
pub const XATTR_ACL_ACCESS: &str = "system.posix_acl_access";
/// Name of the default ACL xattr.
pub const XATTR_ACL_DEFAULT: &str = "system.posix_acl_default";
/// Name of the file capability xattr.
pub const XATTR_CAPABILITY: &str = "security.capability";

const ACL_XATTR_VERSION: u32 = 2;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// The tag of an ACL entry; the discriminants are the kernel's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum AclTag {
    /// `user::` (the owner).
    UserObj = 0x01,
    /// `user:<uid>:`.
    User = 0x02,
    /// `group::` (the owning group).
    GroupObj = 0x04,
    /// `group:<gid>:`.
    Group = 0x08,
    /// `mask::`.
    Mask = 0x10,
    /// `other::`.
    Other = 0x20,
}

impl AclTag {
    fn from_u16(v: u16) -> Option<AclTag> {
        Some(match v {
            0x01 => AclTag::UserObj,
            0x02 => AclTag::User,
            0x04 => AclTag::GroupObj,
            0x08 => AclTag::Group,
            0x10 => AclTag::Mask,
            0x20 => AclTag::Other,
            _ => return None,
        })
    }

    fn text(self) -> &'static str {
        match self {
            AclTag::UserObj | AclTag::User => "user",
            AclTag::GroupObj | AclTag::Group => "group",
            AclTag::Mask => "mask",
            AclTag::Other => "other",
        }
    }

    fn has_id(self) -> bool {
        matches!(self, AclTag::User | AclTag::Group)
    }
}

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AclEntry {
    /// The tag.
    pub tag: AclTag,
    /// Uid or gid for `User`/`Group`, else `None`.
    pub id: Option<u32>,
    /// `rwx` bits (4 = r, 2 = w, 1 = x).
    pub perm: u8,
}

/// A POSIX ACL, entries in kernel order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    entries: Vec<AclEntry>,
}

fn acl_err(msg: impl Into<String>) -> ArchiveError {
    ArchiveError::Acl(msg.into())
}

impl Acl {
    /// An ACL of these entries, sorted into kernel order, with a mask
    /// computed if named entries exist and none was given.
    ///
    /// # Errors
    /// Duplicate or missing base entries, ids on base entries.
    pub fn new(mut entries: Vec<AclEntry>) -> Result<Acl> {
        for e in &entries {
            if e.tag.has_id() != e.id.is_some() {
                return Err(acl_err(format!("entry {:?} has a wrong qualifier", e.tag)));
            }
            if e.perm & !7 != 0 {
                return Err(acl_err("permission bits out of range"));
            }
        }
        entries.sort();
        if entries
            .windows(2)
            .any(|w| (w[0].tag, w[0].id) == (w[1].tag, w[1].id))
        {
            return Err(acl_err("duplicate entry"));
        }
        let count = |entries: &[AclEntry], t: AclTag| entries.iter().filter(|e| e.tag == t).count();
        let named = count(&entries, AclTag::User) + count(&entries, AclTag::Group);
        if count(&entries, AclTag::Mask) == 0 && named > 0 {
            let perm = entries
                .iter()
                .filter(|e| matches!(e.tag, AclTag::User | AclTag::Group | AclTag::GroupObj))
                .fold(0, |acc, e| acc | e.perm);
            entries.push(AclEntry {
                tag: AclTag::Mask,
                id: None,
                perm,
            });
            entries.sort();
        }
        if !entries.is_empty()
            && [AclTag::UserObj, AclTag::GroupObj, AclTag::Other]
                .iter()
                .any(|t| count(&entries, *t) != 1)
        {
            return Err(acl_err(
                "needs exactly one user::, group:: and other:: entry",
            ));
        }
        Ok(Acl { entries })
    }

    /// The entries in kernel order.
    #[must_use]
    pub fn entries(&self) -> &[AclEntry] {
        &self.entries
    }

    /// True if the ACL says no more than the permission bits do (only the
    /// three base entries); GNU tar does not store such access ACLs.
    #[must_use]
    pub fn is_trivial(&self) -> bool {
        self.entries.len() <= 3
    }

    /// Parse libacl text with numeric qualifiers only.
    ///
    /// # Errors
    /// Unknown tags, non-numeric qualifiers, bad permissions.
    pub fn from_text(text: &str) -> Result<Acl> {
        Acl::from_text_with(text, &NameDb::default())
    }

    /// Parse libacl text (as GNU tar stores it). GNU tar 1.34 writes user
    /// and group *names* for qualifiers its host can resolve, even with
    /// `--numeric-owner` (`user:www-data:rw-`); like its `acl_from_text` on
    /// restore, names are resolved with `names`.
    ///
    /// # Errors
    /// Unknown tags, unresolvable names, bad permissions.
    pub fn from_text_with(text: &str, names: &NameDb) -> Result<Acl> {
        let mut entries = Vec::new();
        for raw in text.split(['\n', ',']) {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let line = line
                .strip_prefix("default:")
                .or_else(|| line.strip_prefix("d:"))
                .unwrap_or(line);
            let fields: Vec<&str> = line.split(':').map(str::trim).collect();
            let (tag, qual, perm) = match fields.as_slice() {
                [t, q, p] => (*t, *q, *p),
                [t, p] if matches!(*t, "mask" | "m" | "other" | "o") => (*t, "", *p),
                _ => return Err(acl_err(format!("malformed entry '{line}'"))),
            };
            let named = !qual.is_empty();
            let tag = match (tag, named) {
                ("user" | "u", false) => AclTag::UserObj,
                ("user" | "u", true) => AclTag::User,
                ("group" | "g", false) => AclTag::GroupObj,
                ("group" | "g", true) => AclTag::Group,
                ("mask" | "m", false) => AclTag::Mask,
                ("other" | "o", false) => AclTag::Other,
                _ => return Err(acl_err(format!("malformed entry '{line}'"))),
            };
            let id = if named {
                let kind = if tag == AclTag::User {
                    IdKind::Uid
                } else {
                    IdKind::Gid
                };
                match qual.parse::<u32>() {
                    Ok(id) => Some(id),
                    Err(_) => Some(names.lookup(kind, qual).ok_or_else(|| {
                        acl_err(format!(
                            "unknown {} name '{qual}'",
                            if kind == IdKind::Uid { "user" } else { "group" }
                        ))
                    })?),
                }
            } else {
                None
            };
            let mut bits = 0u8;
            for c in perm.chars() {
                bits |= match c {
                    'r' => 4,
                    'w' => 2,
                    'x' => 1,
                    '-' => 0,
                    _ => return Err(acl_err(format!("bad permissions '{perm}'"))),
                };
            }
            entries.push(AclEntry {
                tag,
                id,
                perm: bits,
            });
        }
        Acl::new(entries)
    }

    /// GNU tar's text form with numeric ids, one entry per line.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for e in &self.entries {
            s.push_str(e.tag.text());
            s.push(':');
            if let Some(id) = e.id {
                s.push_str(&id.to_string());
            }
            s.push(':');
            for (bit, c) in [(4, 'r'), (2, 'w'), (1, 'x')] {
                s.push(if e.perm & bit != 0 { c } else { '-' });
            }
            s.push('\n');
        }
        s
    }

    /// Parse the kernel xattr form.
    ///
    /// # Errors
    /// Wrong version, length or tag.
    pub fn from_xattr(data: &[u8]) -> Result<Acl> {
        if data.len() < 4 || !(data.len() - 4).is_multiple_of(8) {
            return Err(acl_err(format!("xattr of {} bytes", data.len())));
        }
        let version = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
        if version != ACL_XATTR_VERSION {
            return Err(acl_err(format!("xattr version {version}")));
        }
        let mut entries = Vec::with_capacity((data.len() - 4) / 8);
        for chunk in data[4..].chunks_exact(8) {
            let tag = u16::from_le_bytes([chunk[0], chunk[1]]);
            let perm = u16::from_le_bytes([chunk[2], chunk[3]]);
            let id = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            let tag = AclTag::from_u16(tag).ok_or_else(|| acl_err(format!("tag {tag:#x}")))?;
            let perm = u8::try_from(perm).map_err(|_| acl_err("permission bits out of range"))?;
            entries.push(AclEntry {
                tag,
                id: tag.has_id().then_some(id),
                perm,
            });
        }
        Acl::new(entries)
    }

    /// The kernel xattr form.
    #[must_use]
    pub fn to_xattr(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.tag as u16).to_le_bytes());
            out.extend_from_slice(&u16::from(e.perm).to_le_bytes());
            out.extend_from_slice(&e.id.unwrap_or(ACL_UNDEFINED_ID).to_le_bytes());
        }
        out
    }

    /// Map the ids of named entries.
    ///
    /// # Errors
    /// Returns the first unmappable `(kind, id)`.
    pub(crate) fn map_ids(
        &self,
        map: &IdMap,
        dir: Direction,
    ) -> std::result::Result<Acl, (IdKind, u32)> {
        let mut entries = self.entries.clone();
        for e in &mut entries {
            let kind = match e.tag {
                AclTag::User => IdKind::Uid,
                AclTag::Group => IdKind::Gid,
                _ => continue,
            };
            let id = e.id.expect("named entries have ids");
            e.id = Some(map.map(dir, kind, id.into()).ok_or((kind, id))?);
        }
        // Sorting cannot fail validation again: the mapping is injective.
        entries.sort();
        Ok(Acl { entries })
    }

    /// Like [`Acl::map_ids`], with unmappable ids shown as the overflow id,
    /// as the kernel reports them to a process in a user namespace.
    pub(crate) fn map_ids_munged(&self, map: &IdMap, dir: Direction) -> Acl {
        let mut entries = self.entries.clone();
        for e in &mut entries {
            let kind = match e.tag {
                AclTag::User => IdKind::Uid,
                AclTag::Group => IdKind::Gid,
                _ => continue,
            };
            let id = e.id.expect("named entries have ids");
            e.id = Some(
                map.map(dir, kind, id.into())
                    .unwrap_or(crate::idmap::OVERFLOW_ID),
            );
        }
        entries.sort();
        entries.dedup_by(|a, b| (a.tag, a.id) == (b.tag, b.id));
        Acl { entries }
    }
}

/// User and group names for ACL qualifiers, from `passwd`/`group` files
/// (no NSS: LDAP or systemd-userdb names are not resolved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameDb {
    users: std::collections::HashMap<String, u32>,
    groups: std::collections::HashMap<String, u32>,
}

impl NameDb {
    /// Names from `/etc/passwd` and `/etc/group` of this host, as GNU tar
    /// resolves them on restore. Missing files give an empty table.
    ///
    /// # Errors
    /// A file exists but cannot be read.
    pub fn load_system() -> std::io::Result<NameDb> {
        let read = |p: &str| match std::fs::read_to_string(p) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        };
        Ok(NameDb::parse(&read("/etc/passwd")?, &read("/etc/group")?))
    }

    /// Parse `passwd`- and `group`-format text (`name:x:id:…`).
    #[must_use]
    pub fn parse(passwd: &str, group: &str) -> NameDb {
        let table = |text: &str| {
            text.lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    (!name.is_empty() && !name.starts_with('#')).then(|| (name.to_owned(), id))
                })
                .collect()
        };
        NameDb {
            users: table(passwd),
            groups: table(group),
        }
    }

    /// The id of a user or group name.
    #[must_use]
    pub fn lookup(&self, kind: IdKind, name: &str) -> Option<u32> {
        match kind {
            IdKind::Uid => self.users.get(name).copied(),
            IdKind::Gid => self.groups.get(name).copied(),
        }
    }
}

const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const XATTR_CAPS_SZ_2: usize = 20;
const XATTR_CAPS_SZ_3: usize = 24;

/// Map the namespace root of a `security.capability` value.
///
/// Returns `Ok(None)` if the value cannot be represented (unmapped root),
/// which the kernel reports as `EOVERFLOW` and tar skips with a warning.
/// Values of other revisions or sizes are returned unchanged.
pub(crate) fn map_capability(value: &[u8], map: &IdMap, dir: Direction) -> Option<Vec<u8>> {
    if value.len() < 4 {
        return Some(value.to_vec());
    }
    let magic = u32::from_le_bytes(value[..4].try_into().expect("4 bytes"));
    let rev = magic & VFS_CAP_REVISION_MASK;
    let flags = magic & !VFS_CAP_REVISION_MASK;
    match (rev, value.len(), dir) {
        (VFS_CAP_REVISION_3, XATTR_CAPS_SZ_3, _) => {
            let root = u32::from_le_bytes(value[20..24].try_into().expect("4 bytes"));
            let mapped = map.map(dir, IdKind::Uid, root.into())?;
            if dir == Direction::ToContainer && mapped == 0 {
                let mut v2 = value[..XATTR_CAPS_SZ_2].to_vec();
                v2[..4].copy_from_slice(&(VFS_CAP_REVISION_2 | flags).to_le_bytes());
                return Some(v2);
            }
            let mut out = value.to_vec();
            out[20..24].copy_from_slice(&mapped.to_le_bytes());
            Some(out)
        }
        (VFS_CAP_REVISION_2, XATTR_CAPS_SZ_2, Direction::ToHost) => {
            let root = map.to_host(IdKind::Uid, 0)?;
            let mut out = value.to_vec();
            out[..4].copy_from_slice(&(VFS_CAP_REVISION_3 | flags).to_le_bytes());
            out.extend_from_slice(&root.to_le_bytes());
            Some(out)
        }
        _ => Some(value.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GNU_TAR_TEXT: &str = "user::rw-\nuser:1234:rw-\ngroup::r--\nmask::rw-\nother::r--\n";

    #[test]
    fn gnu_tar_text_round_trips_through_xattr() {
        let acl = Acl::from_text(GNU_TAR_TEXT).unwrap();
        assert_eq!(acl.to_text(), GNU_TAR_TEXT);
        let bin = acl.to_xattr();
        assert_eq!(bin.len(), 4 + 5 * 8);
        assert_eq!(Acl::from_xattr(&bin).unwrap(), acl);
        assert!(!acl.is_trivial());
    }

    #[test]
    fn text_variants() {
        let cases = [
            (
                "u::rw,u:5:r,g::r,m::rw,o::-",
                "user::rw-\nuser:5:r--\ngroup::r--\nmask::rw-\nother::---\n",
            ),
            (
                "user::rwx\ngroup::r-x\nother::r-x\n",
                "user::rwx\ngroup::r-x\nother::r-x\n",
            ),
            // missing mask is computed; order normalised; comments dropped
            (
                "group:7:rwx\t#effective:r-x\nuser::rwx\ngroup::r-x\nother::---",
                "user::rwx\ngroup::r-x\ngroup:7:rwx\nmask::rwx\nother::---\n",
            ),
            (
                "default:user::rwx\ndefault:group::r-x\ndefault:other::---",
                "user::rwx\ngroup::r-x\nother::---\n",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Acl::from_text(input).unwrap().to_text(), want, "{input:?}");
        }
        for bad in [
            "user:alice:rw-\nuser::rw-\ngroup::r--\nother::r--",
            "user::rwz\ngroup::r--\nother::r--",
            "user::rw-\nuser::rw-\ngroup::r--\nother::r--",
            "user::rw-\nother::r--",
            "bogus::rw-",
        ] {
            assert!(Acl::from_text(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_resolve_like_gnu_tar_restore() {
        // Verbatim SCHILY.acl.access from GNU tar 1.34 (`setfacl -m
        // u:33:rw,g:33:r,u:1234:r`, `tar cf - --numeric-owner --acls`).
        let gnu = "user::rw-\nuser:www-data:rw-\nuser:1234:r--\ngroup::r--\ngroup:www-data:r--\nmask::rw-\nother::r--\n";
        let names = NameDb::parse(
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n",
            "www-data:x:33:\n",
        );
        let acl = Acl::from_text_with(gnu, &names).unwrap();
        assert_eq!(
            acl.to_text(),
            "user::rw-\nuser:33:rw-\nuser:1234:r--\ngroup::r--\ngroup:33:r--\nmask::rw-\nother::r--\n"
        );
        assert!(Acl::from_text(gnu).is_err());
    }

    #[test]
    fn map_ids_sorts_and_reports_unmapped() {
        let map = IdMap::pve_default_unprivileged();
        let acl =
            Acl::from_text("user::rw-\nuser:5:r--\nuser:2:r--\ngroup::r--\nmask::r--\nother::---")
                .unwrap();
        let host = acl.map_ids(&map, Direction::ToHost).unwrap();
        assert_eq!(
            host.to_text(),
            "user::rw-\nuser:100002:r--\nuser:100005:r--\ngroup::r--\nmask::r--\nother::---\n"
        );
        let back = host.map_ids(&map, Direction::ToContainer).unwrap();
        assert_eq!(back, acl);
        let far = Acl::from_text("user::rw-\nuser:70000:r--\ngroup::r--\nother::---").unwrap();
        assert_eq!(
            far.map_ids(&map, Direction::ToHost),
            Err((IdKind::Uid, 70000))
        );
        assert!(
            far.map_ids_munged(&map, Direction::ToContainer)
                .to_text()
                .contains("user:65534:")
        );
    }

    #[test]
    fn capability_revisions() {
        let map = IdMap::pve_default_unprivileged();
        let mut v2 = (VFS_CAP_REVISION_2 | 1).to_le_bytes().to_vec();
        v2.extend_from_slice(&[0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let v3 = map_capability(&v2, &map, Direction::ToHost).unwrap();
        assert_eq!(v3.len(), XATTR_CAPS_SZ_3);
        assert_eq!(&v3[20..], &100_000u32.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(v3[..4].try_into().unwrap()),
            VFS_CAP_REVISION_3 | 1
        );
        assert_eq!(
            map_capability(&v3, &map, Direction::ToContainer).unwrap(),
            v2
        );
        let mut v3_other = v3.clone();
        v3_other[20..].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(
            map_capability(&v3_other, &map, Direction::ToContainer),
            None
        );
        assert_eq!(
            &map_capability(&v3_other, &map, Direction::ToHost).unwrap()[20..],
            &100_005u32.to_le_bytes()
        );
    }
}
