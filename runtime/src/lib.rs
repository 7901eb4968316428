pub mod philox;
