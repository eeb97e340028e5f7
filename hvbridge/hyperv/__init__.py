"""Hyper-V naming, in three modules that import downward only:

- guids: pure GUID and port facts (the vsock service template, VmId wildcards, parse_guid,
  AF_HYPERV socket-address helpers, vm_id_matches). addresses.py imports only this one.
- registry: the GuestCommunicationServices key (ServiceRegistry, MemoryRegistry, WinRegistry;
  register/unregister/list). Uses winreg on Windows only.
- vms: VM names -> VmIds (VmInfo, VmLookup, the PowerShell/WMI/wslinfo/hcsdiag parsers,
  SubprocessVmLookup, VmResolver). Runs Windows tools through subprocess.

None of them imports trio or creates sockets.
"""
