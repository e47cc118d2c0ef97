import os

import pytest
import torch

from hyena_glt.tokenizer import (
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL,
    ByteTokenizer,
    SeqType,
    detect_seq_type,
    reverse_complement,
)


def test_round_trip_every_byte_value():
    tok = ByteTokenizer()
    data = bytes(range(256)) + os.urandom(4096)
    enc = tok.encode(data)
    assert enc.ids.dtype == torch.int64 and enc.ids.shape == (len(data),)
    assert int(enc.ids.min()) >= NUM_SPECIAL and int(enc.ids.max()) < tok.vocab_size
    assert tok.decode(enc.ids, enc.soft_mask) == data


def test_uppercases_and_flags_soft_masked_bases():
    tok = ByteTokenizer()
    enc = tok.encode(b"ACgtNn")
    assert tok.decode(enc.ids) == b"ACGTNN"
    assert enc.soft_mask.tolist() == [False, False, True, True, False, True]
    assert tok.decode(enc.ids, enc.soft_mask) == b"ACgtNn"


def test_specials_added_and_skipped():
    tok = ByteTokenizer()
    enc = tok.encode("ACGT", add_bos=True, add_eos=True)
    assert enc.ids[0] == BOS_ID and enc.ids[-1] == EOS_ID
    assert enc.soft_mask.shape == enc.ids.shape
    assert tok.decode(enc.ids) == b"ACGT"
    with pytest.raises(ValueError):
        tok.decode(enc.ids, skip_special=False)


def test_reverse_complement_iupac_and_case():
    assert reverse_complement(b"ACGTRYKMSWBDHVN") == b"NBDHVWSKMRYACGT"
    assert reverse_complement(b"aCgTn") == b"nAcGt"
    assert reverse_complement(b"ACGU", rna=True) == b"ACGU"
    assert reverse_complement(b"AAUU", rna=True) == b"AAUU"
    assert reverse_complement(b"AUGC", rna=True) == b"GCAU"


def test_reverse_complement_is_an_involution(ecoli):
    import gzip

    text = gzip.open(ecoli, "rt").read(200_000).split("\n", 1)[1].replace("\n", "")
    seq = (text[:50_000] + text[50_000:100_000].lower() + "RYKMSWBDHVN-").encode()
    assert reverse_complement(reverse_complement(seq)) == seq
    assert reverse_complement(seq) != seq


@pytest.mark.parametrize(
    "seq,kind",
    [
        (b"ACGTNACGT", SeqType.DNA),
        (b"acgtRYN", SeqType.DNA),
        (b"ACGUUGCA", SeqType.RNA),
        (b"MKTAYIAKQRQISFVKSHFSRQ", SeqType.PROTEIN),
        (b"ACGTU", SeqType.MIXED),
        (b"ACGT#\x00", SeqType.MIXED),
    ],
)
def test_seq_type_detection(seq, kind):
    assert detect_seq_type(seq) == kind
    assert ByteTokenizer().encode(seq).seq_type == kind


def test_seq_type_can_be_given():
    assert ByteTokenizer().encode(b"ACGT", seq_type=SeqType.RNA).seq_type == SeqType.RNA
