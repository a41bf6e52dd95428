//! A NIC as `--net` names it: `tap=NAME,mac=XX:XX:XX:XX:XX:XX` or
//! `fd=N,mac=...` (a tap the caller opened and passes in).

use std::fmt;
use std::str::FromStr;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("mac {s:?}: expected six hex bytes like 02:00:00:00:00:01");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 == 1 {
            return Err(format!("mac {s}: a multicast address cannot name a NIC"));
        }
        Ok(MacAddr(mac))
    }
}

/// Where a NIC's frames go on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap device podbox-vmm opens by name (in its network namespace).
    Tap(String),
    /// A tap file descriptor podbox-vmm inherited.
    Fd(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub mac: MacAddr,
}

/// Linux interface names: 1 to 15 bytes, no '/', ':', ',', '=' or whitespace.
fn is_interface_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"/:,=".contains(&b))
}

impl NetConfig {
    /// What parsing checks, for a NetConfig built in code.
    pub fn validate(&self) -> Result<(), String> {
        match &self.backend {
            NetBackend::Tap(name) if !is_interface_name(name) => {
                Err(format!("tap {name:?}: not an interface name"))
            }
            NetBackend::Fd(fd) if *fd <= 2 => {
                Err(format!("fd {fd}: expected a descriptor above 2"))
            }
            _ if self.mac.0[0] & 1 == 1 => Err(format!(
                "mac {}: a multicast address cannot name a NIC",
                self.mac
            )),
            _ => Ok(()),
        }
    }
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut backend, mut mac) = (None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            let slot_taken = match key {
                "tap" | "fd" => backend.is_some(),
                "mac" => mac.is_some(),
                other => return Err(format!("unknown key {other:?}: expected tap, fd or mac")),
            };
            if slot_taken {
                return Err(format!("{key}: given twice, or both tap and fd"));
            }
            match key {
                "tap" if is_interface_name(value) => {
                    backend = Some(NetBackend::Tap(value.to_string()))
                }
                "tap" => return Err(format!("tap {value:?}: not an interface name")),
                "fd" => {
                    let fd = value
                        .parse::<i32>()
                        .ok()
                        .filter(|fd| *fd > 2)
                        .ok_or_else(|| format!("fd {value:?}: expected a descriptor above 2"))?;
                    backend = Some(NetBackend::Fd(fd));
                }
                _ => mac = Some(value.parse::<MacAddr>()?),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or("missing tap=NAME or fd=N")?,
            mac: mac.ok_or("missing mac=XX:XX:XX:XX:XX:XX")?,
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            NetBackend::Tap(name) => write!(f, "tap={name}")?,
            NetBackend::Fd(fd) => write!(f, "fd={fd}")?,
        }
        write!(f, ",mac={}", self.mac)
    }
}
