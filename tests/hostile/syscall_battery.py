# System calls a transform never needs, through ctypes: kernel facilities that widen the attack
# surface (io_uring, bpf, perf, userfaultfd, keyrings), memory of other processes, new-style
# mount and namespace calls, file-descriptor tricks. Returns a grid if any of them worked.
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def syscall(number, *args):
    """syscall(2) with every integer passed as a full 64-bit long (ctypes would pass an int)."""
    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
PARENT = os.getppid()
buffer = ctypes.create_string_buffer(4096)
iovec = (ctypes.c_uint64 * 2)(ctypes.addressof(buffer), 64)

CALLS = {
    "io_uring_setup": (425, 8, ctypes.byref(buffer)),
    "bpf": (321, 0, ctypes.byref(buffer), 72),
    "perf_event_open": (298, ctypes.byref(buffer), 0, -1, -1, 0),
    "userfaultfd": (323, 0),
    "keyctl": (250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the user keyring
    "add_key": (248, b"user", b"fp16rl", b"x", 1, -4),
    "memfd_create": (319, b"fp16rl", 0),
    "memfd_secret": (447, 0),
    "process_vm_readv": (310, PARENT, ctypes.byref(iovec), 1, ctypes.byref(iovec), 1, 0),
    "ptrace_attach": (101, 16, PARENT, 0, 0),
    "pidfd_open": (434, PARENT, 0),
    "kcmp": (312, os.getpid(), PARENT, 0, 0, 0),
    "open_tree": (428, -100, b"/", 1),
    "fsopen": (430, b"tmpfs", 0),
    "unshare": (272, 0x00020000),
    "personality": (135, 0x0008),  # ADDR_NO_RANDOMIZE
    "name_to_handle_at": (303, -100, b"/", ctypes.byref(buffer), ctypes.byref(buffer), 0),
    "inotify_init1": (294, 0),
    "fanotify_init": (300, 0, 0),
    "eventfd2": (290, 0, 0),
    "timerfd_create": (283, 1, 0),
    "signalfd4": (289, -1, ctypes.byref(buffer), 8, 0),
    "epoll_create1": (291, 0),
    "timer_create": (222, 1, None, ctypes.byref(buffer)),
    "mlock": (149, ctypes.addressof(buffer), 4096),
    "seccomp_get_notif_sizes": (317, 3, 0, ctypes.byref(buffer)),
    "landlock_create_ruleset": (444, None, 0, 1),
    "getpgid_of_parent": (121, PARENT),
    "mincore": (27, ctypes.addressof(buffer) & ~4095, 4096, ctypes.byref(buffer)),
    "flock": (73, 0, 2),
    "setpgid": (109, 0, 0),
    "sync": (162,),
}


def transform(grid):
    worked = [name for name, (nr, *args) in CALLS.items() if syscall(nr, *args) >= 0]
    if worked:
        return [[min(len(worked), 9)]]
    raise PermissionError("every call was refused")
