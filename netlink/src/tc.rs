//! Traffic control: the ingress qdisc and the redirect filters that join a
//! pod's tap to its CNI interface.
