// swift-tools-version: 5.9
// A small library (OndeviceLoRA) an app links, plus a macOS command line that drives it.
import PackageDescription

let package = Package(
    name: "OndeviceLoRAExample",
    // Stateful models (MLState), multifunction packages and int4 weights need iOS 18 / macOS 15.
    platforms: [.iOS("18.0"), .macOS("15.0")],
    products: [
        .library(name: "OndeviceLoRA", targets: ["OndeviceLoRA"]),
        .executable(name: "ondevice-lora-demo", targets: ["ondevice-lora-demo"]),
    ],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
    ],
    targets: [
        .target(
            name: "OndeviceLoRA",
            dependencies: [.product(name: "Tokenizers", package: "swift-transformers")]
        ),
        .executableTarget(name: "ondevice-lora-demo", dependencies: ["OndeviceLoRA"]),
    ]
)
