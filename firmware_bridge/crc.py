"""CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor.

check("123456789") = 0x29B1. binascii.crc_hqx is exactly this CRC, in C.
"""

from __future__ import annotations

import binascii

CHECK_VALUE = 0x29B1


def crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)
