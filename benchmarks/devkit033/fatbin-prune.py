#!/usr/bin/env python3
"""Zero the device code a Hopper (sm_90) GPU never loads, in place, so that xz packs it to nothing.

A CUDA .so keeps its kernels in the ELF section .nv_fatbin (and relocatable device code for
device linking in __nv_relfatbin, same format): a row of fatbins, each a header
(magic 0xBA55ED50) and entries (kind 1 = PTX, 2 = cubin/SASS, other kinds kept as they are),
each with its own header naming the arch (75, 80, 86, 90, 100, 120, ...). On an sm_90 device the
driver loads the sm_90 (or sm_90a) cubin, or JIT-compiles PTX of arch <= 90 when there is no
sm_90 cubin; SASS of other majors cannot run there. So this keeps every header (offsets and
sizes unchanged, the file stays valid) and overwrites with zeros the payload of:
  - cubins whose arch is not 90 (KEEP_ARCHS);
  - PTX whose arch is above 90, and PTX of arch <= 90 in a fatbin that also has an sm_90 cubin.
Usage: fatbin-prune.py [--dry] FILE...     (prints MB kept / zeroed per file)
"""
import struct, sys

KEEP = {90}
MAGIC = 0xBA55ED50

def sections(data):
    # minimal ELF64 section walk
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stro = hdrs[shstrndx][4]
    for h in hdrs:
        name = data[stro + h[0]: data.index(b"\0", stro + h[0])].decode()
        yield name, h[4], h[5], h[1]   # name, file offset, size, type

def prune(path, dry=False):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if data[:4] != b"\x7fELF":
        return 0, 0
    kept = zeroed = 0
    for name, off, size, typ in sections(data):
        if name not in (".nv_fatbin", "__nv_relfatbin") or typ == 8:  # 8 = NOBITS
            continue
        p, end = off, off + size
        while p + 16 <= end:
            magic, ver, hsz, fsz = struct.unpack_from("<IHHQ", data, p)
            if magic != MAGIC:
                p += 8  # fatbins are 8-aligned; skip padding
                continue
            q, fend = p + hsz, p + hsz + fsz
            ents = []
            while q + 64 <= fend:
                kind, _v, ehsz, psz = struct.unpack_from("<HHIQ", data, q)
                arch, = struct.unpack_from("<I", data, q + 28)
                if ehsz < 64 or q + ehsz + psz > fend:
                    break
                ents.append((kind, arch, q + ehsz, psz))
                q += ehsz + psz
            has90 = any(k == 2 and a in KEEP for k, a, _, _ in ents)
            for kind, arch, po, psz in ents:
                drop = (kind == 2 and arch not in KEEP) or (kind == 1 and (arch > max(KEEP) or has90))
                if drop:
                    zeroed += psz
                    if not dry:
                        data[po:po + psz] = bytes(psz)
                else:
                    kept += psz
            p = fend
    if zeroed and not dry:
        with open(path, "r+b") as f:
            f.write(data)
    return kept, zeroed

if __name__ == "__main__":
    args = sys.argv[1:]
    dry = "--dry" in args
    tk = tz = 0
    for a in args:
        if a == "--dry":
            continue
        k, z = prune(a, dry)
        tk += k; tz += z
        if k or z:
            print(f"fatbin-prune: {a}: kept {k/1e6:.1f} MB, zeroed {z/1e6:.1f} MB")
    print(f"fatbin-prune: total kept {tk/1e6:.1f} MB, zeroed {tz/1e6:.1f} MB")
