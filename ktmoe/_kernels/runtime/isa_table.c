/* isa_table.c: the kernel targets of kt_isas.h as tables: name, compiler flags and needed CPU
 * features of each (ktmoe.h), and their GEMM entry points (isa_table.h) for the GEMM harness
 * (_gemm.pyx). The pass dispatch table is moe_layer.c's, written over the same list. */
#include "isa_table.h"

#define KT_ROW_NAME(name, NAME, needs, flags) #name,
#define KT_ROW_FLAGS(name, NAME, needs, flags) flags,
#define KT_ROW_NEEDS(name, NAME, needs, flags) (needs),
#define KT_ROW_GEMMS(name, NAME, needs, flags) \
    {kt_gemm_nt_##name, kt_gemm_nn_##name, kt_igemm_nt_##name, kt_igemm_nn_##name},
static const char *const names[KT_NISA] = {KT_ISA_LIST(KT_ROW_NAME)};
static const char *const flag_strings[KT_NISA] = {KT_ISA_LIST(KT_ROW_FLAGS)};
static const unsigned needs_bits[KT_NISA] = {KT_ISA_LIST(KT_ROW_NEEDS)};
static const kt_isa_gemms gemms[KT_NISA] = {KT_ISA_LIST(KT_ROW_GEMMS)};

const char *kt_isa_name(int isa) { return isa >= 0 && isa < KT_NISA ? names[isa] : "?"; }
const char *kt_isa_flags(int isa) { return isa >= 0 && isa < KT_NISA ? flag_strings[isa] : ""; }
unsigned kt_isa_needs(int isa) { return isa >= 0 && isa < KT_NISA ? needs_bits[isa] : ~0u; }
const kt_isa_gemms *kt_isa_gemm_table(int isa) { return isa >= 0 && isa < KT_NISA ? &gemms[isa] : 0; }
