// ABI test compiled as C++17; the body is abi_main.inc.
#include "abi_main.inc"
