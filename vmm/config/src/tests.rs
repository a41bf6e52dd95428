use clap::Parser;

use super::*;

fn config() -> VmConfig {
    VmConfig {
        cmdline: "console=ttyS0".into(),
        vcpus: 2,
        ..VmConfig::new("/k")
    }
}

/// Parses `config`'s command line as podbox-vmm does.
fn parsed(config: &VmConfig) -> Result<VmConfig, String> {
    let argv = std::iter::once("podbox-vmm".into()).chain(config.to_args());
    VmArgs::try_parse_from(argv)
        .map_err(|e| e.to_string())?
        .into_config()
        .map_err(|e| e.to_string())
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, last])
}

#[test]
fn every_config_survives_the_command_line() {
    let full = VmConfig {
        initrd: Some("/i n/itrd".into()),
        cmdline: "quiet init=/podbox-agent".into(),
        vcpus: MAX_VCPUS,
        memory_mib: 512,
        serial: SerialOutput::File {
            path: "/run/p/console.log".into(),
            max_bytes: 65536,
        },
        pvm: PvmMode::Off,
        vsock: Some(VsockConfig {
            cid: 7,
            socket: "/run/p/vsock.sock".into(),
        }),
        fs: Some(FsConfig {
            tag: "podbox".into(),
            backend: FsBackend::Spawn(VirtiofsdSpec {
                shared_dir: "/run/p/share".into(),
                binary: Some("/usr/libexec/virtiofsd".into()),
                socket: Some("/run/p/virtiofsd.sock".into()),
                cache: CachePolicy::Always,
                sandbox: SandboxMode::Chroot,
            }),
        }),
        nics: vec![
            NetConfig {
                backend: NetBackend::Tap("tap0".into()),
                mac: mac(1),
            },
            NetConfig {
                backend: NetBackend::Fd(5),
                mac: mac(2),
            },
        ],
        guest_profile: Some(ProfileConfig {
            path: "/tmp/a,b/boot.profile".into(),
            hz: 250,
        }),
        // A chroot virtiofsd needs the jail off (and the flag round-trips).
        jail: JailMode::Off,
        ..VmConfig::new("/boot/vmlinux")
    };
    let socket_only = VmConfig {
        fs: Some(FsConfig {
            tag: "t".into(),
            backend: FsBackend::Socket("/s".into()),
        }),
        ..config()
    };
    let defaults = VmConfig {
        fs: Some(FsConfig {
            tag: "podbox".into(),
            backend: FsBackend::Spawn(VirtiofsdSpec::new("/share")),
        }),
        ..VmConfig::new("/k")
    };
    let dashes = VmConfig {
        cmdline: "-x --y".into(),
        initrd: Some("-relative/initrd".into()),
        ..VmConfig::new("-k")
    };
    for config in [
        config(),
        VmConfig::new("/k"),
        full,
        socket_only,
        defaults,
        dashes,
    ] {
        assert_eq!(
            parsed(&config),
            Ok(config.clone()),
            "{:?}",
            config.to_args()
        );
    }
}

#[test]
fn the_command_line_defaults_are_vm_config_new() {
    let parsed = VmArgs::try_parse_from(["podbox-vmm", "--kernel", "/k"])
        .expect("parses")
        .into_config();
    assert_eq!(parsed, Ok(VmConfig::new("/k")));
}

#[test]
fn accepts_a_sane_config() {
    assert_eq!(config().validate(), Ok(()));
    assert_eq!(config().memory_bytes(), 256 << 20);
}

#[test]
fn out_of_range_values_are_refused_naming_the_flag() {
    let refused = |config: VmConfig| config.validate().unwrap_err().to_string();
    assert!(refused(VmConfig {
        vcpus: 0,
        ..config()
    })
    .starts_with("--vcpus 0"));
    assert!(refused(VmConfig {
        vcpus: MAX_VCPUS + 1,
        ..config()
    })
    .starts_with("--vcpus 33"));
    assert!(refused(VmConfig {
        memory_mib: 8,
        ..config()
    })
    .starts_with("--memory-mib 8"));
    assert!(refused(VmConfig {
        cmdline: "a\nb".into(),
        ..config()
    })
    .starts_with("--cmdline"));
    let vsock = |cid| {
        Some(VsockConfig {
            cid,
            socket: "/s".into(),
        })
    };
    assert!(refused(VmConfig {
        vsock: vsock(2),
        ..config()
    })
    .starts_with("--vsock-cid 2"));
    assert!(VmConfig {
        vsock: vsock(u64::from(u32::MAX)),
        ..config()
    }
    .validate()
    .is_err());
    assert_eq!(
        VmConfig {
            vsock: vsock(3),
            ..config()
        }
        .validate(),
        Ok(())
    );
    let fs = |tag: &str| {
        Some(FsConfig {
            tag: tag.into(),
            backend: FsBackend::Socket("/s".into()),
        })
    };
    assert!(refused(VmConfig {
        fs: fs(""),
        ..config()
    })
    .starts_with("--fs-tag"));
    assert!(VmConfig {
        fs: fs(&"t".repeat(FS_TAG_LEN + 1)),
        ..config()
    }
    .validate()
    .is_err());
    assert_eq!(
        VmConfig {
            fs: fs("podbox"),
            ..config()
        }
        .validate(),
        Ok(())
    );
    let nic = NetConfig {
        backend: NetBackend::Fd(3),
        mac: mac(1),
    };
    let nics = vec![nic; MAX_NICS + 1];
    assert!(refused(VmConfig { nics, ..config() }).starts_with("--net: at most 8"));
    let nic = |backend, last| NetConfig {
        backend,
        mac: mac(last),
    };
    let (fd3, tap0) = (NetBackend::Fd(3), NetBackend::Tap("tap0".into()));
    let ok = vec![
        nic(fd3.clone(), 1),
        nic(NetBackend::Fd(4), 2),
        nic(tap0.clone(), 3),
    ];
    assert_eq!(
        VmConfig {
            nics: ok,
            ..config()
        }
        .validate(),
        Ok(())
    );
    for (nics, expect) in [
        (vec![nic(fd3.clone(), 1), nic(fd3.clone(), 2)], "--net: fd=3 twice"),
        (
            vec![nic(tap0.clone(), 1), nic(NetBackend::Fd(4), 2), nic(tap0, 3)],
            "--net: tap=tap0 twice",
        ),
        (
            vec![nic(fd3, 1), nic(NetBackend::Fd(4), 1)],
            "--net: mac=02:00:00:00:00:01 twice (fd=3,mac=02:00:00:00:00:01 and fd=4,mac=02:00:00:00:00:01)",
        ),
    ] {
        let err = refused(VmConfig { nics, ..config() });
        assert!(err.starts_with(expect), "{err}");
        assert!(err.ends_with("each NIC needs its own tap (tap=NAME or fd=N) and MAC"), "{err}");
    }
    let tap = |name: &str| NetConfig {
        backend: NetBackend::Tap(name.into()),
        mac: mac(1),
    };
    let nics = vec![tap("a,mac=02:00:00:00:00:09")];
    assert!(refused(VmConfig { nics, ..config() }).contains("not an interface name"));
    let serial = SerialOutput::File {
        path: "-".into(),
        max_bytes: DEFAULT_SERIAL_MAX_BYTES,
    };
    assert!(refused(VmConfig { serial, ..config() }).starts_with("--serial:"));
}

#[test]
fn serial_file_size_limit_is_bounded() {
    let serial = |max_bytes| VmConfig {
        serial: SerialOutput::File {
            path: "/s".into(),
            max_bytes,
        },
        ..config()
    };
    assert_eq!(serial(DEFAULT_SERIAL_MAX_BYTES).validate(), Ok(()));
    assert_eq!(serial(4096).validate(), Ok(()));
    assert_eq!(serial(1 << 30).validate(), Ok(()));
    for bad in [0, 4095, (1 << 30) + 1, u64::MAX] {
        let err = serial(bad).validate().unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("--serial-max-bytes {bad}:")),
            "{err}"
        );
    }
}

#[test]
fn flags_that_make_no_sense_alone_are_refused() {
    let parse = |argv: &[&str]| {
        VmArgs::try_parse_from(argv)
            .map_err(|e| e.to_string())
            .and_then(|a| a.into_config().map_err(|e| e.to_string()))
    };
    let err = parse(&["vmm", "--kernel", "/k", "--serial-max-bytes", "4096"]).unwrap_err();
    assert!(err.starts_with("--serial-max-bytes: only applies"), "{err}");
    let err = parse(&["vmm", "--kernel", "/k", "--fs-cache", "never"]).unwrap_err();
    assert!(err.contains("need --shared-dir"), "{err}");
    let err = parse(&["vmm", "--kernel", "/k", "--vsock-cid", "lots"]).unwrap_err();
    assert!(err.contains("--vsock-cid"), "{err}");
}

#[test]
fn nics_are_parsed_with_errors_naming_the_part() {
    let nic: NetConfig = "tap=tap0,mac=02:00:00:00:00:0a".parse().expect("valid");
    assert_eq!(nic.backend, NetBackend::Tap("tap0".into()));
    assert_eq!(nic.to_string(), "tap=tap0,mac=02:00:00:00:00:0a");
    for (bad, says) in [
        ("tap=tap0", "missing mac"),
        ("mac=02:00:00:00:00:01", "missing tap"),
        ("tap=a/b,mac=02:00:00:00:00:01", "not an interface name"),
        (
            "tap=waytoolonginterfacename,mac=02:00:00:00:00:01",
            "not an interface name",
        ),
        ("fd=1,mac=02:00:00:00:00:01", "above 2"),
        ("tap=t,fd=4,mac=02:00:00:00:00:01", "both tap and fd"),
        ("tap=t,mac=01:00:00:00:00:01", "multicast"),
        ("tap=t,mac=02:00:00:00:00", "six hex bytes"),
        ("tap=t,mac=02:00:00:00:00:01:02", "six hex bytes"),
        ("tap=t,mac=zz:00:00:00:00:01", "six hex bytes"),
        ("tap=t,mac=02:00:00:00:00:01,mtu=9000", "unknown key"),
        ("tap", "key=value"),
    ] {
        let err = bad.parse::<NetConfig>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn guest_profile_takes_a_file_and_an_optional_rate() {
    let p: ProfileConfig = "/tmp/boot.txt".parse().expect("valid");
    assert_eq!(p.path, std::path::Path::new("/tmp/boot.txt"));
    assert_eq!(p.hz, DEFAULT_PROFILE_HZ);
    let p: ProfileConfig = "/tmp/x,y.txt,hz=1000".parse().expect("valid");
    assert_eq!((p.path.to_str(), p.hz), (Some("/tmp/x,y.txt"), 1000));
    let p: ProfileConfig = "/tmp/x,y.txt".parse().expect("a comma in a path");
    assert_eq!(p.path.to_str(), Some("/tmp/x,y.txt"));
    for (bad, says) in [
        ("f,hz=0", "from 1 to 1000"),
        ("f,hz=1001", "from 1 to 1000"),
        ("f,hz=fast", "\"fast\""),
        ("f,rate=5", "the only option is hz=N"),
        (",hz=10", "a file to write the profile to"),
        ("", "a file to write the profile to"),
    ] {
        let err = bad.parse::<ProfileConfig>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
    let zero = VmConfig {
        guest_profile: Some(ProfileConfig {
            path: "/p".into(),
            hz: 0,
        }),
        ..config()
    };
    assert!(zero.validate().unwrap_err().to_string().contains("hz=0"));
    let err = VmArgs::try_parse_from(["vmm", "--kernel", "/k", "--guest-profile", "p,hz=0"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--guest-profile") && err.contains("hz="),
        "{err}"
    );
}
