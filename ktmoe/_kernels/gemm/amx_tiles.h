/* amx_tiles.h: the one AMX tile configuration ktmoe uses (palette 1, all 8 tiles 16 rows x
 * 64 bytes), shared by the GEMMs (gemm_amx.c) and the roofline probe (roofline.c).
 *
 * gcc 12 trap (design.md 8): its _tile_loadconfig declares only 8 of the 64 configuration
 * bytes as read, so at -O2/-O3 the stores that fill the rest may be dropped or sunk past
 * the ldtilecfg (SIGILL / SIGSEGV at the first tile instruction). The compiler barrier
 * right before the load makes the whole configuration count as read. Compile with the
 * AMX flags; the caller must hold the process's AMX permission. */
#ifndef KTMOE_AMX_TILES_H
#define KTMOE_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} kt_tilecfg;

static inline void kt_amx_configure(void) {
    _Alignas(64) kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}
#endif
