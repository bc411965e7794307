/* isa_table.h: the GEMM entry points of every kernel target (kt_isas.h), for the GEMM harness. */
#ifndef KTMOE_ISA_TABLE_H
#define KTMOE_ISA_TABLE_H
#include "ktmoe.h"
#include "gemm/gemm.h"
#include "gemm/gemm_int8.h"

typedef struct {
    kt_gemm_fn nt, nn;      /* bf16, gemm.h */
    kt_igemm_fn int_nt, int_nn; /* int8, gemm_int8.h */
} kt_isa_gemms;
/* The GEMMs of target isa < KT_NISA, or NULL. */
const kt_isa_gemms *kt_isa_gemm_table(int isa);
#endif
